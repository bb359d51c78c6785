"""Run a detector on images, in onnxruntime or in PyTorch, with one output format.

Both backends take images as cv2 gives them (``ndarray[H, W, 3]``, BGR, uint8) and return one
:class:`Detections` per image, in original-image pixels:

- :class:`OnnxDetector`: an exported file in onnxruntime; everything it needs to prepare images is
  in the file's metadata. :meth:`OnnxDetector.check_matches` refuses a config it does not belong to.
- :class:`TorchDetector`: the mmdet model itself (``model.test_step`` through the config's test
  pipeline), the reference the exported file is compared with.

:func:`onnx_eval_model` lets mmengine's test loop (``tools/test.py --onnx``) evaluate an ONNX file
with the config's own dataloader and metrics.
"""
import json
import os.path as osp
from typing import Optional, Sequence

import numpy as np

from .detections import Detections, paste_masks
from .metadata import META, config_classes, file_sha256
from .preprocess import InputSpec, make_batch, prepare


class ModelMismatchError(ValueError):
    """An ONNX file used with a config (or checkpoint) it was not exported from."""


class OnnxDetector:
    """An exported detector in onnxruntime (CPU).

    Args:
        path: the ``.onnx`` file written by :func:`dcn_det.deploy.export_onnx`.
        threads: onnxruntime's intra-op threads (default: its own choice, one per core).

    Raises:
        ModelMismatchError: the file lacks dcn_det's metadata (not exported by dcn_det).
    """

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
        missing = [key for key in (META['classes'], META['input']) if key not in self.metadata]
        if missing:
            raise ModelMismatchError(f'{path!r} has no dcn_det metadata ({", ".join(missing)}): it was not written '
                                     'by tools/export_onnx.py, so its classes and input are unknown')
        self.classes = tuple(json.loads(self.metadata[META['classes']]))
        self.spec = InputSpec.from_json(self.metadata[META['input']])
        shape = self.session.get_inputs()[0].shape  # [N, 3, H, W]; a dynamic dimension is a name
        self.batch_size = shape[0] if isinstance(shape[0], int) else None
        self.fixed_shape = tuple(shape[2:]) if all(isinstance(s, int) for s in shape[2:]) else None
        self.mask_thr = float(self.metadata.get(META['mask_thr_binary'], 0.5))
        self.with_mask = 'masks' in [o.name for o in self.session.get_outputs()]

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
            boxes, scores, labels, num, *masks = self.session.run(None, feed)
            for i in range(real):
                det = Detections(boxes[i, :num[i]], scores[i, :num[i]], labels[i, :num[i]])
                if masks:
                    h, w = ori_shapes[start + i][:2]
                    det = det._replace(masks=paste_masks(masks[0][i, :num[i]], det.boxes, h, w, self.mask_thr))
                results.append(det)
        return results

    def check_matches(self, cfg, config_path: str, checkpoint: Optional[str] = None) -> None:
        """Refuse (ModelMismatchError, both sides named) a config whose classes or input differ from the
        file's, or a checkpoint other than the one exported (compared by SHA-256)."""
        classes = config_classes(cfg)
        if tuple(classes) != self.classes:
            raise ModelMismatchError(f'{self.path} was exported for classes {_short(self.classes)} but {config_path} '
                                     f'has {_short(classes)}: export it from this config')
        spec = InputSpec.from_config(cfg)
        differences = self.spec.differences(spec)
        if differences:
            told = '; '.join(f'{name} {mine} in the ONNX file, {theirs} in the config'
                             for name, mine, theirs in differences)
            raise ModelMismatchError(f'{self.path} expects another input than {config_path} prepares ({told}): '
                                     'export it from this config')
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
                f'images to up to {need[0]}x{need[1]} (h x w): export with --dynamic or --shape {need[0]} {need[1]}')


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


def onnx_eval_model(detector: OnnxDetector):
    """An mmengine ``BaseModel`` whose ``test_step`` runs ``detector`` on a dataloader batch, so that
    mmengine's test loop, hooks and metrics evaluate the ONNX file as they evaluate the PyTorch model."""
    import torch
    from mmengine.model import BaseModel
    from mmengine.structures import InstanceData

    class OnnxEvalModel(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.detector = detector

        def forward(self, *args, **kwargs):
            raise NotImplementedError('an ONNX model only evaluates (test_step)')

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
