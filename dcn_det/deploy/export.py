"""Export a dcn_det / mmdet Faster or Mask R-CNN to one ONNX file of standard operators, and what it records.

:func:`export_onnx` traces :class:`~dcn_det.deploy.detector.DeployableDetector` with
``torch.onnx.export(..., dynamo=True)`` while every deformable layer runs on torchvision's kernels
(:func:`~dcn_det.deploy.detector.export_kernels`): deformable convs become ONNX ``DeformConv``
(opset 19), (modulated) deformable RoI pooling becomes ``RoiAlign`` over offset bins (with the
adaptive sampling ratio the configs train with), NMS ``NonMaxSuppression``. The result is checked
with ``onnx.checker`` (full check), refused if any node lies outside the standard domains, given its
metadata (:data:`~dcn_det.deploy.metadata.META`), written atomically, and run once in onnxruntime against PyTorch.
"""
import json
import logging
import os
import os.path as osp
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from dcn_det.checkpoint import atomic_write

from .detections import count_unmatched
from .detector import DeployableDetector, as_list, export_kernels, name_failing_layer
from .metadata import INPUT_NAMES, META, OUTPUT_NAMES, file_sha256, output_names, outputs_doc
from .preprocess import InputSpec

MIN_OPSET = 19  # ONNX DeformConv exists from opset 19
DEFAULT_OPSET = 19
STANDARD_DOMAINS = ('', 'ai.onnx')


@dataclass
class ExportResult:
    path: str
    opset: Optional[int]  # None for an OpenVINO IR
    input_shape: list  # [N, 3, H, W], None where dynamic
    op_types: list  # sorted ONNX op types in the graph
    max_abs_diff: dict  # output name -> max |onnxruntime - PyTorch| on the example batch
    same_detections: bool  # the same detections in both (to 1e-4 in score, 1e-2 px; any order among ties)


def export_onnx(detector: nn.Module, spec: InputSpec, out: str, *, classes: Sequence[str], config_text: str = '',
                config_path: str = '', checkpoint: Optional[str] = None, model_digest: str = '',
                opset: int = DEFAULT_OPSET,
                shape: Optional[Sequence[int]] = None, dynamic: bool = False, batch_size: int = 1,
                verify: bool = True, optimize: bool = True) -> ExportResult:
    """Write ``detector`` (an mmdet two-stage detector, weights loaded) to ``out`` as ONNX.

    Args:
        spec: the config's input contract (:meth:`InputSpec.from_config`).
        classes: the class names, stored in the metadata (their number must match the bbox head).
        model_digest: :func:`~dcn_det.deploy.metadata.model_sha256` of the config, stored in the metadata.
        shape: (H, W) of a fixed input, multiples of ``spec.pad_size_divisor``; default
            ``spec.default_shape()`` (holds every image the config's resize produces). With ``dynamic``,
            only the size of the example traced.
        dynamic: batch size, height and width all dynamic (H and W multiples of the pad divisor).
        batch_size: the fixed batch size of a static export.
        verify: run the written file in onnxruntime on the example batch and compare with PyTorch.
        optimize: let the exporter simplify the graph (constant folding etc.: a third of the nodes, a faster
            file); off only to export faster, as the tests do.

    Raises:
        ValueError: opset below 19, a bad shape, classes that do not match the model, ``out`` exists.
        NotExportableError: a layer that cannot be exported (named in the message).
    """
    import onnx

    check_target(out, opset)
    wrapper, example = prepare_export(detector, spec, classes, shape, dynamic, batch_size)
    names = output_names(wrapper.with_mask)
    with torch.no_grad(), export_kernels(detector):
        with name_failing_layer(detector, 'run'):
            expected = wrapper(*example)
        with name_failing_layer(detector, 'export'), _quiet_exporter():
            program = torch.onnx.export(
                wrapper, example, dynamo=True, opset_version=opset, input_names=list(INPUT_NAMES),
                output_names=list(names), dynamic_shapes=_dynamic_shapes(spec.pad_size_divisor) if dynamic
                else None, report=False, verbose=False, optimize=optimize)
    model = program.model_proto
    check_standard(model)
    input_shape = [None, 3, None, None] if dynamic else list(example[0].shape)
    onnx.helper.set_model_props(model, file_metadata(spec, classes, input_shape, config_text, config_path,
                                                     checkpoint, model_digest, _versions(), wrapper))
    model.doc_string = f'{wrapper.kind} exported by dcn_det from {config_path or "a config"}'
    onnx.checker.check_model(model, full_check=True)
    _save_atomic(model, out)
    result = ExportResult(out, opset, input_shape, sorted({node.op_type for node in model.graph.node}), {}, True)
    if verify:
        from .backends import OnnxDetector

        got = OnnxDetector(out).session.run(None, {k: v.numpy() for k, v in zip(INPUT_NAMES, example, strict=True)})
        result.max_abs_diff, result.same_detections = compare_outputs(got, [t.numpy() for t in expected], names)
    return result


def prepare_export(detector: nn.Module, spec: InputSpec, classes: Sequence[str], shape: Optional[Sequence[int]],
                   dynamic: bool, batch_size: int) -> tuple[DeployableDetector, tuple[torch.Tensor, ...]]:
    """The wrapper to export (``detector`` put in eval mode on the CPU) and the example batch to trace and
    verify with, once ``classes`` and ``shape`` are checked (see :func:`export_onnx`'s arguments)."""
    num_classes = as_list(detector.roi_head.bbox_head)[-1].num_classes
    if len(classes) != num_classes:
        raise ValueError(f'the model has {num_classes} classes but the config names {len(classes)} '
                         f'({", ".join(map(str, classes[:5]))}{", ..." if len(classes) > 5 else ""}): set the '
                         "dataset's metainfo classes to the model's")
    h, w = tuple(shape) if shape else spec.default_shape()
    d = spec.pad_size_divisor
    if h % d or w % d or h < 2 * d or w < 2 * d:
        fix = f'{max(spec.pad(h), 2 * d)} {max(spec.pad(w), 2 * d)}'
        raise ValueError(f'--shape {h} {w}: height and width must be multiples of the config\'s pad_size_divisor '
                         f'({d}) and at least {2 * d}, e.g. --shape {fix}')
    detector = detector.eval().cpu()
    wrapper = DeployableDetector(detector, spec).eval()
    n = 2 if dynamic else batch_size
    if dynamic:
        # trace with every pyramid level at least 2x3 cells: a size of 1 in the traced example would be
        # specialised (taken as always 1), and equal H and W could be taken as always equal
        stride = max(detector.rpn_head.prior_generator.strides)[0]
        h, w = max(h, spec.pad(2 * stride)), max(w, spec.pad(3 * stride))
        w += d if w == h else 0
    return wrapper, example_inputs(n, h, w)


def file_metadata(spec: InputSpec, classes: Sequence[str], input_shape: list, config_text: str, config_path: str,
                  checkpoint: Optional[str], model_digest: str, versions: dict,
                  wrapper: DeployableDetector) -> dict[str, str]:
    """The :data:`~dcn_det.deploy.metadata.META` entries an exported file carries, as strings."""
    mask = {META['mask_thr_binary']: str(float(wrapper.detector.roi_head.test_cfg.mask_thr_binary))} \
        if wrapper.with_mask else {}
    return {
        META['classes']: json.dumps(list(classes)),
        META['input']: spec.to_json(),
        META['input_shape']: json.dumps(input_shape),
        META['outputs']: outputs_doc(wrapper.with_mask),
        META['config']: config_text,
        META['config_path']: config_path,
        META['model_sha256']: model_digest,
        META['checkpoint']: checkpoint or '',
        META['checkpoint_sha256']: file_sha256(checkpoint) if checkpoint else '',
        META['versions']: json.dumps(versions),
        **mask,
    }


def compare_outputs(got: Sequence[np.ndarray], expected: Sequence[np.ndarray],
                    names: Sequence[str] = OUTPUT_NAMES) -> tuple[dict, bool]:
    """Max |got - expected| per output (``names``), and whether both hold the same detections (to 1e-4 in
    score, 1e-2 px; any order among ties)."""
    diffs = {}
    for name, a, b in zip(names, got, expected, strict=True):
        diffs[name] = float(np.abs(a - b).max()) if a.shape == b.shape and a.size else \
            (0.0 if a.shape == b.shape else float('inf'))
    same = bool((got[3] == expected[3]).all()) and not any(
        count_unmatched([x[i, :got[3][i]] for x in got[:3]], [x[i, :got[3][i]] for x in expected[:3]])
        for i in range(len(got[3])))
    return diffs, same


def check_target(out: str, opset: int) -> None:
    """Refuse (ValueError) an opset below :data:`MIN_OPSET` or an existing ``out``, before any work."""
    if opset < MIN_OPSET:
        raise ValueError(f'opset {opset} is too old: ONNX has DeformConv (deformable convolution) only from opset '
                         f'{MIN_OPSET}; below it torch writes a model that the ONNX checker and onnxruntime reject. '
                         f'Use --opset {MIN_OPSET} or newer (onnxruntime >= 1.25 runs it)')
    if osp.exists(out):
        raise ValueError(f'{out!r} exists: remove it or choose another output path')


def example_inputs(n: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch to trace and verify with: random blobs (for the RPN to propose on) plus pixel noise (so
    that no two proposals pool alike and tie in score), full-size images."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(h // 16, 2), max(w // 16, 2), generator=g) * 255
    images = torch.nn.functional.interpolate(coarse, size=(h, w), mode='bilinear', align_corners=False)
    images = (images + torch.randn(images.shape, generator=g) * 12).clamp(0, 255).round()
    img_shapes = torch.tensor([[h, w]], dtype=torch.float32).repeat(n, 1)
    return images, img_shapes, torch.ones(n, 2, dtype=torch.float64)


def check_standard(model) -> None:
    """Raise ValueError if a node of ``model`` (or of a function or subgraph in it) is outside the
    standard ONNX domains, naming the first ones."""
    custom = sorted({f'{node.domain}::{node.op_type}' for node in iter_nodes(model)
                     if node.domain not in STANDARD_DOMAINS})
    custom += [f'function {f.domain}::{f.name}' for f in model.functions if f.domain not in STANDARD_DOMAINS]
    if custom:
        raise ValueError(f'the exported graph uses non-standard operators {custom[:5]}: onnxruntime and other '
                         'runtimes would need custom kernels for them')


def iter_nodes(model):
    """Every node of the graph, its functions and their subgraphs (If/Loop bodies)."""
    import onnx

    def walk(nodes):
        for node in nodes:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g.node)
                for g in attr.graphs:
                    yield from walk(g.node)

    yield from walk(model.graph.node)
    for function in model.functions:
        yield from walk(function.node)


def read_metadata(model_or_path) -> dict[str, str]:
    """``metadata_props`` of an ONNX model (or file) as a dict."""
    import onnx

    model = onnx.load(model_or_path, load_external_data=False) if isinstance(model_or_path, str) else model_or_path
    return {p.key: p.value for p in model.metadata_props}


def _dynamic_shapes(divisor: int) -> dict:
    from torch.export import Dim

    batch = Dim('batch', min=1, max=64)
    # H and W stay multiples of the divisor, so every stride-2 level divides exactly, as in mmdet
    rows, cols = Dim('rows', min=1, max=4096 // divisor), Dim('cols', min=1, max=4096 // divisor)
    return {'images': {0: batch, 2: divisor * rows, 3: divisor * cols}, 'img_shapes': {0: batch},
            'scale_factors': {0: batch}}


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's notes (deprecations, "attribute type is ambiguous", ...); errors still raise."""
    loggers = [logging.getLogger(name) for name in ('onnx_ir', 'onnxscript', 'torch.onnx', 'torch.export')]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _versions() -> dict:
    import onnx
    import onnxscript
    import torchvision

    import dcn_det
    return {'dcn_det': dcn_det.__version__, 'torch': torch.__version__, 'torchvision': torchvision.__version__,
            'onnx': onnx.__version__, 'onnxscript': onnxscript.__version__}


def _save_atomic(model, out: str) -> None:
    import onnx

    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    atomic_write(out, lambda tmp: onnx.save(model, tmp))
