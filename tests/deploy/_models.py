"""Tiny detectors from the shipped configs, with random weights everywhere (offset and mask predictors
included, so the deformable layers deform), and test images."""
import copy
import functools
import os.path as osp

import cv2
import numpy as np
import torch
from mmengine.config import Config

from tests._helpers import CONFIG_DIR, shrink_detector

CLASSES = ('ellipse', 'triangle', 'star')
# Every anchor goes to NMS and every detection is kept (no cut among equal scores), and no proposal is
# under 4 px: with random weights, boxes clipped to a sliver at the border pool alike and tie in score,
# and NMS kernels break ties apart. The best 200 proposals keep the tests fast.
NO_CUTOFF = dict(score_thr=0.0, max_per_img=2000, rpn_nms_pre=100000, rpn_max_per_img=200, rpn_min_bbox_size=4)


@functools.lru_cache(maxsize=None)
def _parsed(name: str) -> Config:
    return Config.fromfile(osp.join(CONFIG_DIR, name))


def shipped_config(name: str) -> Config:
    """A fresh copy of ``configs/<name>`` (parsed once per test session)."""
    return copy.deepcopy(_parsed(name))


def tiny_config(name: str, image_size: int = 64, **test_cfg) -> Config:
    """``configs/<name>`` shrunk (8 base channels, 16-channel FPN, 3 classes), test images resized to
    ``image_size``; ``test_cfg`` overrides ``model.test_cfg.rcnn`` (and ``rpn_*`` keys the RPN's)."""
    cfg = shipped_config(name)
    shrink_detector(cfg, num_classes=len(CLASSES))
    cfg.test_dataloader.dataset.metainfo = dict(classes=CLASSES)
    for step in cfg.test_dataloader.dataset.pipeline:
        if step['type'] == 'Resize':
            step['scale'] = (image_size, image_size)
    for key, value in test_cfg.items():
        if key.startswith('rpn_'):
            cfg.model.test_cfg.rpn[key[4:]] = value
        else:
            cfg.model.test_cfg.rcnn[key] = value
    return cfg


def tiny_model(cfg: Config, seed: int = 0) -> torch.nn.Module:
    """The config's model with random weights; zero-initialised layers (offset and mask predictors)
    get small random weights, so that offsets of about a pixel and masks away from 0.5 are exercised."""
    from dcn_det.checkpoint import load_detector

    torch.manual_seed(seed)
    model = load_detector(copy.deepcopy(cfg), None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def make_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A BGR uint8 picture of smooth blobs plus pixel noise: no two regions alike, so that no two
    proposals tie in score (NMS kernels break ties differently: mmcv's sort is unstable)."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((max(height // 8, 2), max(width // 8, 2), 3)) * 255).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


def mmdet_batch_predict(model, cfg: Config, images) -> list:
    """mmdet's own predictions for ``images`` run as ONE batch (padded to the largest, as mmdet does):
    ``[(boxes, scores, labels), ...]``."""
    from dcn_det.deploy import TorchDetector

    pipeline = TorchDetector(model, cfg).pipeline  # the config's test pipeline, on arrays
    data = [pipeline(dict(img=image, img_id=i)) for i, image in enumerate(images)]
    with torch.no_grad():
        samples = model.test_step(dict(inputs=[d['inputs'] for d in data],
                                       data_samples=[d['data_samples'] for d in data]))
    return [(s.pred_instances.bboxes.numpy(), s.pred_instances.scores.numpy(), s.pred_instances.labels.numpy())
            for s in samples]


def assert_same_detections(got, want, score_tol: float = 1e-5, box_tol: float = 1e-2) -> None:
    """The same detections in both ``(boxes, scores, labels)``, in any order among equal scores
    (:func:`dcn_det.deploy.agreement.count_unmatched`)."""
    from dcn_det.deploy.detections import count_unmatched

    assert len(got[1]) == len(want[1]), f'{len(got[1])} detections, expected {len(want[1])}'
    missing = count_unmatched(got, want, score_tol, box_tol)
    assert not missing, f'{missing} of {len(got[1])} detections unmatched (score_tol {score_tol}, box_tol {box_tol})'


def write_checkpoint(cfg_path, path):
    """A checkpoint of the config's model with :func:`tiny_model`'s random weights, as dcn_det saves one."""
    from dcn_det.checkpoint import atomic_save

    atomic_save({'meta': {}, 'state_dict': tiny_model(Config.fromfile(str(cfg_path))).state_dict()}, str(path))
    return path


def generate_tiny_val_data(root):
    """``root/data``: the shapes generator's data for :data:`CLASSES`, 3 val images (and 1 train) of 80 px with 1-3
    objects each, for the tools' end-to-end tests."""
    from dcn_det.data.synthetic import generate

    generate(root / 'data', seed=2, num_train=1, num_val=3, image_size=80, classes=CLASSES, min_size=12,
             max_size=30, objects_per_image=(1, 3))
    return root / 'data'


def export_checkpoint_onnx(cfg_path, ckpt, out):
    """The config's model with ``ckpt`` loaded, exported to ``out`` as ``tools/export_onnx.py`` records it (config
    path and checkpoint); unoptimised, which exports faster."""
    from dcn_det.deploy import InputSpec, config_classes, export_onnx

    cfg = Config.fromfile(str(cfg_path))
    model = tiny_model(cfg)
    model.load_state_dict(torch.load(ckpt, weights_only=True)['state_dict'])
    export_onnx(model, InputSpec.from_config(cfg), str(out), classes=config_classes(cfg), config_path=str(cfg_path),
                checkpoint=str(ckpt), optimize=False)
    return out


def refused(main, *args, capsys) -> str:
    """Run a tool's ``main`` in this process; it must exit with status 2 and one line on stderr."""
    import pytest

    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err
