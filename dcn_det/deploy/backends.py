"""Run a detector on images, in onnxruntime, OpenVINO or PyTorch, with one output format.

Every backend takes images as cv2 gives them (``ndarray[H, W, 3]``, BGR, uint8) and returns one
:class:`Detections` per image, in original-image pixels:

- :class:`DeployedDetector`: an exported file in a runtime; everything it needs to prepare images is
  in the file's metadata. :meth:`DeployedDetector.check_matches` refuses a config it does not belong to.
  :class:`OnnxDetector` runs an ONNX file in onnxruntime, :class:`OpenVinoDetector` an OpenVINO IR.
- :class:`TorchDetector`: the mmdet model itself (``model.test_step`` through the config's test
  pipeline), the reference the exported file is compared with.

:func:`onnx_eval_model` lets mmengine's test loop (``tools/test.py --onnx``) evaluate an ONNX file
(or ``--openvino``) with the config's own dataloader and metrics.
"""
import json
import os.path as osp
from typing import Optional, Sequence

import numpy as np

from .detections import Detections, paste_masks
from .metadata import INPUT_NAMES, META, OUTPUT_NAMES, config_classes, file_sha256, model_sha256
from .preprocess import InputSpec, make_batch, prepare

PRECISIONS = {'f32': 'f32', 'bf16': 'bf16'}  # OpenVinoDetector's precision -> OpenVINO's INFERENCE_PRECISION_HINT
_RUNTIME_TYPE_NAMES = {'f32': 'float32', 'bf16': 'bfloat16'}  # how a compiled model reports each

class ModelMismatchError(ValueError):
    """An exported file used with a config (or checkpoint) it was not exported from."""


class DeployedDetector:
    """An exported detector in a runtime: what every backend shares (metadata, image preparation, batching,
    checks against a config). A backend sets :attr:`metadata` and the input shape through
    :meth:`_read_contract` and implements :meth:`infer`.

    Attributes:
        classes, spec: the class names and the input contract, from the file's metadata.
        batch_size, fixed_shape: the file's fixed batch size and (H, W), or None where dynamic.
    """
    kind = 'exported model'  # how messages name the file
    exporter = 'tools/export_onnx.py'  # the tool that writes it
    can_be_dynamic = True  # the exporter offers --dynamic
    path: str
    metadata: dict

    def _read_contract(self, shape: Sequence) -> None:
        """Read classes and input contract from :attr:`metadata`, batch size and fixed size from ``shape``
        ([N, 3, H, W]; a dynamic dimension anything but an int)."""
        missing = [key for key in (META['classes'], META['input']) if key not in self.metadata]
        if missing:
            raise ModelMismatchError(f'{self.path!r} has no dcn_det metadata ({", ".join(missing)}): it was not '
                                     f'written by {self.exporter}, so its classes and input are unknown')
        self.classes = tuple(json.loads(self.metadata[META['classes']]))
        self.spec = InputSpec.from_json(self.metadata[META['input']])
        self.batch_size = shape[0] if isinstance(shape[0], int) else None
        self.fixed_shape = tuple(shape[2:]) if all(isinstance(s, int) for s in shape[2:]) else None
        self.mask_thr = float(self.metadata.get(META['mask_thr_binary'], 0.5))
        self.with_mask = META['mask_thr_binary'] in self.metadata  # a mask model's exporter writes it

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs (:data:`~dcn_det.deploy.metadata.OUTPUTS`) for its inputs ``feed``."""
        raise NotImplementedError

    def __call__(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detect in ``images`` (each ``ndarray[H, W, 3]``, BGR)."""
        prepared = [prepare(image, self.spec) for image in images]
        return self.run([p.image for p in prepared], [p.scale_factor for p in prepared],
                        [image.shape[:2] for image in images])

    def run(self, images: Sequence[np.ndarray], scale_factors: Sequence[Sequence[float]],
            ori_shapes: Optional[Sequence[Sequence[int]]] = None) -> list[Detections]:
        """Detect in already resized images (``ndarray[3, h, w]``, as the config's test pipeline makes
        them) with their ``scale_factors`` ((w, h) from the original image); batched to fit the model. A mask
        model's masks are pasted into images of ``ori_shapes`` ((h, w) each; needed then)."""
        if self.with_mask and ori_shapes is None:
            raise ValueError(f'{self.path} is a mask model: pass each image\'s original (h, w) as ori_shapes')
        step = self.batch_size or max(len(images), 1)
        results = []
        for start in range(0, len(images), step):
            chunk, factors = list(images[start:start + step]), list(scale_factors[start:start + step])
            real = len(chunk)
            while len(chunk) < step:  # a fixed batch size: fill with copies, dropped below
                chunk.append(chunk[0])
                factors.append(factors[0])
            feed = make_batch(chunk, factors, self.spec, self.fixed_shape)
            boxes, scores, labels, num, *masks = self.infer(feed)
            for i in range(real):
                det = Detections(boxes[i, :num[i]], scores[i, :num[i]], labels[i, :num[i]])
                if masks:
                    h, w = ori_shapes[start + i][:2]
                    det = det._replace(masks=paste_masks(masks[0][i, :num[i]], det.boxes, h, w, self.mask_thr))
                results.append(det)
        return results

    def check_matches(self, cfg, config_path: str, checkpoint: Optional[str] = None) -> None:
        """Refuse (ModelMismatchError, both sides named) a config whose classes, input or model section
        differ from the file's (the last by :func:`~dcn_det.deploy.metadata.model_sha256`, where the file
        records it), or a checkpoint other than the one exported (compared by SHA-256)."""
        classes = config_classes(cfg)
        if tuple(classes) != self.classes:
            raise ModelMismatchError(f'{self.path} was exported for classes {_short(self.classes)} but {config_path} '
                                     f'has {_short(classes)}: export it from this config')
        spec = InputSpec.from_config(cfg)
        differences = self.spec.differences(spec)
        if differences:
            told = '; '.join(f'{name} {mine} in the {self.kind}, {theirs} in the config'
                             for name, mine, theirs in differences)
            raise ModelMismatchError(f'{self.path} expects another input than {config_path} prepares ({told}): '
                                     'export it from this config')
        recorded = self.metadata.get(META['model_sha256'])
        if recorded and recorded != model_sha256(cfg):
            source = self.metadata.get(META['config_path']) or 'another config'
            raise ModelMismatchError(f'{self.path} is stale: it was exported from {source} with another model section '
                                     f'(sha256 {recorded[:12]}...) than {config_path} has now '
                                     f'({model_sha256(cfg)[:12]}...): export it again with {self.exporter}')
        want = self.metadata.get(META['checkpoint_sha256'])
        if checkpoint and want:
            have = file_sha256(checkpoint)
            if have != want:
                source = self.metadata.get(META['checkpoint']) or 'another checkpoint'
                raise ModelMismatchError(f'{self.path} was exported from {source} (sha256 {want[:12]}...), not from '
                                         f'{checkpoint} (sha256 {have[:12]}...): export it from this checkpoint')

    def shape_problem(self) -> Optional[str]:
        """Why a fixed-shape model cannot hold every image its config's resize makes, or None."""
        need = self.spec.default_shape()
        if self.fixed_shape is None or (self.fixed_shape[0] >= need[0] and self.fixed_shape[1] >= need[1]):
            return None
        return (f'{self.path} has a fixed input of {self.fixed_shape[0]}x{self.fixed_shape[1]} but the config resizes '
                f'images to up to {need[0]}x{need[1]} (h x w): export with '
                f'{"--dynamic or " if self.can_be_dynamic else ""}--shape {need[0]} {need[1]}')


class OnnxDetector(DeployedDetector):
    """An exported detector in onnxruntime (CPU).

    Args:
        path: the ``.onnx`` file written by :func:`dcn_det.deploy.export_onnx`.
        threads: onnxruntime's intra-op threads (default: its own choice, one per core).

    Raises:
        ModelMismatchError: the file lacks dcn_det's metadata (not exported by dcn_det).
    """
    kind = 'ONNX file'

    def __init__(self, path: str, threads: Optional[int] = None) -> None:
        import onnxruntime as ort

        if not osp.isfile(path):
            raise FileNotFoundError(f'ONNX model {path!r} does not exist')
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: not the graph optimiser's notes
        self.path = path
        self.session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self._read_contract(self.session.get_inputs()[0].shape)  # a dynamic dimension is a name

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feed)


class OpenVinoDetector(DeployedDetector):
    """An IR written by :func:`~dcn_det.deploy.export_openvino`, in OpenVINO's CPU plugin, in f32 or bf16
    (``INFERENCE_PRECISION_HINT``: the CPU plugin's own default is bf16 on CPUs with AVX512_BF16 or AMX, so
    the precision is always set, and one the CPU cannot give is refused rather than run in another).

    Args:
        path: the ``.xml`` file; its ``.bin`` must lie beside it.
        threads: OpenVINO's inference threads (``INFERENCE_NUM_THREADS``; default: its own choice).
        precision: ``'f32'`` or ``'bf16'`` (:data:`PRECISIONS`), set as ``INFERENCE_PRECISION_HINT``.

    Raises:
        FileNotFoundError: the ``.xml`` or its ``.bin`` is missing.
        ValueError: a precision other than f32/bf16, or one this CPU does not run (named, with the fix).
        ModelMismatchError: the IR lacks dcn_det's metadata.
    """
    kind = 'OpenVINO IR'
    exporter = 'tools/export_openvino.py'
    can_be_dynamic = False

    def __init__(self, path: str, threads: Optional[int] = None, precision: str = 'f32') -> None:
        import openvino as ov

        if not osp.isfile(path):
            raise FileNotFoundError(f'OpenVINO model {path!r} does not exist')
        weights = osp.splitext(path)[0] + '.bin'
        if not osp.isfile(weights):
            raise FileNotFoundError(f'{weights!r} is missing: an OpenVINO IR is {path} plus its weights {weights} '
                                    f'beside it, as {self.exporter} writes them; copy both, or export again')
        if precision not in PRECISIONS:
            raise ValueError(f'precision {precision!r} for {path}: use --precision f32 (exact) or bf16 (faster on CPUs '
                             'with AVX512_BF16 or AMX)')
        core = ov.Core()
        if precision == 'bf16' and 'BF16' not in core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES'):
            raise ValueError(f'precision bf16 for {path}: this CPU ({core.get_property("CPU", "FULL_DEVICE_NAME")}) '
                             'has no bf16 in OpenVINO (it needs AVX512_BF16 or AMX): use --precision f32')
        self.path, self.precision = path, precision
        model = core.read_model(path)
        self.metadata = {key: model.get_rt_info([key]).astype(str) for key in META.values()
                         if model.has_rt_info([key])}
        self._read_contract([d.get_length() if d.is_static else None for d in model.inputs[0].get_partial_shape()])
        config = {'INFERENCE_PRECISION_HINT': PRECISIONS[precision], 'PERFORMANCE_HINT': 'LATENCY'}
        if threads:
            config['INFERENCE_NUM_THREADS'] = threads
        self.compiled = core.compile_model(model, 'CPU', config)
        running = str(self.compiled.get_property('INFERENCE_PRECISION_HINT'))
        if _RUNTIME_TYPE_NAMES[precision] not in running:  # never run in another precision than asked
            raise ValueError(f'precision {precision} for {path}: OpenVINO compiled it for {running} instead; use '
                             '--precision f32')
        self.request = self.compiled.create_infer_request()

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer({name: feed[name] for name in INPUT_NAMES})
        # copies: the request's output tensors are overwritten by the next call
        return [np.array(results[self.compiled.output(name)]) for name in OUTPUT_NAMES]


def open_deployed(onnx: Optional[str] = None, openvino: Optional[str] = None, threads: Optional[int] = None,
                  precision: Optional[str] = None) -> DeployedDetector:
    """The ``onnx`` file in onnxruntime or else the ``openvino`` IR in OpenVINO (at ``precision``, default f32)."""
    if onnx:
        return OnnxDetector(onnx, threads=threads)
    return OpenVinoDetector(openvino, threads=threads, precision=precision or 'f32')


class TorchDetector:
    """The mmdet model on the config's test pipeline (``mmdet.apis.inference_detector``'s steps), CPU."""

    def __init__(self, model, cfg) -> None:
        from mmcv.transforms import Compose
        from mmdet.utils import get_test_pipeline_cfg
        from mmengine.registry import init_default_scope

        init_default_scope(cfg.get('default_scope', 'mmdet'))
        self.model = model.eval()
        pipeline = [dict(step) for step in get_test_pipeline_cfg(cfg)
                    if str(step['type']).split('.')[-1] != 'LoadAnnotations']
        pipeline[0]['type'] = 'mmdet.LoadImageFromNDArray'
        self.pipeline = Compose(pipeline)

    def __call__(self, images: Sequence[np.ndarray]) -> list[Detections]:
        import torch

        results = []
        for image in images:
            data = self.pipeline(dict(img=image, img_id=0))
            with torch.no_grad():
                pred = self.model.test_step(dict(inputs=[data['inputs']], data_samples=[data['data_samples']]))[0]
            p = pred.pred_instances
            results.append(Detections(p.bboxes.numpy().astype(np.float32), p.scores.numpy().astype(np.float32),
                                      p.labels.numpy().astype(np.int64),
                                      p.masks.numpy().astype(bool) if 'masks' in p else None))
        return results


def onnx_eval_model(detector: DeployedDetector):
    """An mmengine ``BaseModel`` whose ``test_step`` runs ``detector`` (onnxruntime, OpenVINO) on a dataloader
    batch, so that mmengine's test loop, hooks and metrics evaluate the exported file as they evaluate the
    PyTorch model."""
    import torch
    from mmengine.model import BaseModel
    from mmengine.structures import InstanceData

    class OnnxEvalModel(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.detector = detector

        def forward(self, *args, **kwargs):
            raise NotImplementedError('an exported model only evaluates (test_step)')

        def test_step(self, data: dict) -> list:
            samples = data['data_samples']
            images = [t.numpy() for t in data['inputs']]
            dets = self.detector.run(images, [s.metainfo['scale_factor'] for s in samples],
                                     [s.metainfo['ori_shape'] for s in samples])
            for sample, det in zip(samples, dets, strict=True):
                sample.pred_instances = InstanceData(bboxes=torch.from_numpy(det.boxes),
                                                     scores=torch.from_numpy(det.scores),
                                                     labels=torch.from_numpy(det.labels))
                if det.masks is not None:
                    sample.pred_instances.masks = torch.from_numpy(det.masks)
            return samples

        val_step = test_step

    return OnnxEvalModel()


def _short(classes: Sequence[str]) -> str:
    shown = ', '.join(map(str, classes[:6]))
    return f'({shown}{", ..." if len(classes) > 6 else ""}; {len(classes)} classes)'
