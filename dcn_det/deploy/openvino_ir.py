"""The detector as one OpenVINO IR (``.xml`` + ``.bin``), converted from PyTorch.

OpenVINO's ONNX reader has no rule for ONNX ``DeformConv``, so the IR is not made from the ONNX file:
:func:`export_openvino` hands the same wrapper the ONNX export traces
(:class:`~dcn_det.deploy.detector.DeployableDetector`, on the same torchvision kernels,
:func:`~dcn_det.deploy.detector.export_kernels`) to ``openvino.convert_model``, whose PyTorch frontend
turns ``torchvision::deform_conv2d`` into OpenVINO's own ``DeformableConvolution``, the per-bin
``roi_align`` of deformable RoI pooling into ``ROIAlign`` (adaptive ``sampling_ratio`` 0, ``half_pixel``
alignment: mmcv's rule, as in the ONNX file) and ``nms`` into ``NonMaxSuppression``: standard opsets only,
no extension library. The IR carries the ONNX file's metadata (:data:`~dcn_det.deploy.metadata.META`) in
its ``rt_info``, has a fixed input shape, and keeps its weights in f32.

:class:`~dcn_det.deploy.backends.OpenVinoDetector` runs it with the onnxruntime detector's interface.
"""
import os
import os.path as osp
import shutil
import tempfile
from typing import Optional, Sequence

import torch
from torch import nn

from .backends import OpenVinoDetector
from .detector import NotExportableError, export_kernels, name_failing_layer
from .export import ExportResult, _quiet_exporter, compare_outputs, file_metadata, prepare_export
from .metadata import INPUT_NAMES, OUTPUT_NAMES
from .preprocess import InputSpec


def export_openvino(detector: nn.Module, spec: InputSpec, out: str, *, classes: Sequence[str], config_text: str = '',
                    config_path: str = '', checkpoint: Optional[str] = None, model_digest: str = '',
                    shape: Optional[Sequence[int]] = None, batch_size: int = 1, verify: bool = True) -> ExportResult:
    """Write ``detector`` (an mmdet two-stage detector, weights loaded) to ``out`` (``.xml``, and its
    ``.bin`` beside it) as an OpenVINO IR of fixed input shape; arguments as
    :func:`~dcn_det.deploy.export_onnx`'s. ``verify`` runs the IR in f32 on the example batch against PyTorch.

    Raises:
        ValueError: ``out`` not ``.xml`` or it (or its ``.bin``) exists, a bad shape, classes that do not
            match the model, an operator outside OpenVINO's standard opsets.
        NotExportableError: a layer that cannot be converted (named in the message).
    """
    import openvino as ov

    check_ir_target(out)
    wrapper, example = prepare_export(detector, spec, classes, shape, False, batch_size)
    if wrapper.with_mask:
        raise NotExportableError(f'a {wrapper.kind} is not exported to OpenVINO (its masks output is ONNX-only): '
                                 'export it with tools/export_onnx.py, or export the box detector only')
    with torch.no_grad(), export_kernels(detector):
        with name_failing_layer(detector, 'run'):
            expected = wrapper(*example)
        with name_failing_layer(detector, 'convert'), _quiet_exporter():
            model = ov.convert_model(wrapper, example_input=example, input=[tuple(t.shape) for t in example])
    for port, name in zip(model.inputs, INPUT_NAMES, strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, OUTPUT_NAMES, strict=True):
        port.get_tensor().set_names({name})
    op_types = check_standard_opsets(model)
    input_shape = list(example[0].shape)
    for key, value in file_metadata(spec, classes, input_shape, config_text, config_path, checkpoint, model_digest,
                                    _versions(), wrapper).items():
        model.set_rt_info(value, [key])
    _save_atomic(model, out)
    result = ExportResult(out, None, input_shape, op_types, {}, True)
    if verify:
        got = OpenVinoDetector(out, precision='f32').infer({k: v.numpy() for k, v in zip(INPUT_NAMES, example,
                                                                                        strict=True)})
        result.max_abs_diff, result.same_detections = compare_outputs(got, [t.numpy() for t in expected])
    return result


def check_ir_target(out: str) -> None:
    """Refuse (ValueError) an output path that is not ``.xml`` or whose ``.xml`` or ``.bin`` exists."""
    if not out.endswith('.xml'):
        raise ValueError(f'{out!r} must end in .xml (its weights go to the .bin beside it)')
    for path in (out, osp.splitext(out)[0] + '.bin'):
        if osp.exists(path):
            raise ValueError(f'{path!r} exists: remove it or choose another output path')


def check_standard_opsets(model) -> list[str]:
    """The sorted op types of ``model``; ValueError naming any op outside OpenVINO's standard opsets (a
    framework node left unconverted, or an op only an extension library would run)."""
    types, custom = set(), set()
    for op in model.get_ordered_ops():
        info = op.get_type_info()
        types.add(info.name)
        if not str(info.version_id).startswith('opset'):
            custom.add(f'{info.name} ({info.version_id})')
    if custom:
        raise ValueError(f'the converted model has non-standard operations {sorted(custom)[:5]}: OpenVINO would '
                         'need an extension library for them')
    return sorted(types)


def _versions() -> dict:
    import openvino
    import torchvision

    import dcn_det
    return {'dcn_det': dcn_det.__version__, 'torch': torch.__version__, 'torchvision': torchvision.__version__,
            'openvino': openvino.__version__}


def _save_atomic(model, out: str) -> None:
    """Write ``out`` and its ``.bin`` (weights kept in f32) into a temporary folder beside them, then move the
    ``.bin`` and last the ``.xml`` into place: an ``.xml`` is only ever there with its weights."""
    import openvino as ov

    folder = osp.dirname(osp.abspath(out))
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.ir-', dir=folder)
    try:
        ov.save_model(model, osp.join(tmp, 'model.xml'), compress_to_fp16=False)
        os.replace(osp.join(tmp, 'model.bin'), osp.splitext(out)[0] + '.bin')
        os.replace(osp.join(tmp, 'model.xml'), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
