"""A Mask R-CNN and a Cascade Mask R-CNN exported to ONNX: the same detections and masks in onnxruntime as in
PyTorch."""
import numpy as np
import pytest

from dcn_det.deploy import InputSpec, OnnxDetector, TorchDetector, config_classes, export_onnx, paste_masks
from tests.deploy._models import NO_CUTOFF, assert_same_detections, make_image, tiny_config, tiny_model

IMAGES = [(50, 70, 1), (90, 60, 2)]


@pytest.fixture(scope='module', params=['shapes_r18_mask_dcnv2.py', 'cascade_mask_rcnn_dcnv2.py'])
def exported(request, tmp_path_factory):
    cfg = tiny_config(request.param, **dict(NO_CUTOFF, max_per_img=100))
    model = tiny_model(cfg)
    path = str(tmp_path_factory.mktemp('onnx') / 'mask.onnx')
    result = export_onnx(model, InputSpec.from_config(cfg), path, classes=config_classes(cfg),
                         config_path=request.param, dynamic=True, optimize=False)
    return cfg, model, path, result


def _by_score(det):
    order = np.lexsort((det.boxes[:, 1], det.boxes[:, 0], -det.scores))
    return det.masks[order]


@pytest.mark.slow  # one export
def test_onnxruntime_gives_pytorchs_detections_and_masks(exported):
    cfg, model, path, result = exported
    assert result.same_detections and result.max_abs_diff['masks'] < 1e-4
    detector = OnnxDetector(path, threads=1)
    assert detector.with_mask and detector.mask_thr == cfg.model.test_cfg.rcnn.mask_thr_binary
    images = [make_image(h, w, seed=s) for h, w, s in IMAGES]
    for image, got, want in zip(images, detector(images), TorchDetector(model, cfg)(images), strict=True):
        assert len(got.scores) > 10 and want.masks is not None
        assert_same_detections(got, want, score_tol=1e-4, box_tol=2e-2)
        assert got.masks.shape == want.masks.shape == (len(got.scores), *image.shape[:2]) and got.masks.dtype == bool
        assert want.masks.any()
        # pixels on the threshold may flip between runtimes: at most 1 in 1000
        assert (_by_score(got) != _by_score(want)).mean() < 1e-3


def test_paste_masks_is_mmdets_paste():
    import torch
    from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask

    rng = np.random.default_rng(0)
    k, m, h, w = 12, 28, 60, 45
    probs = rng.uniform(size=(k, m, m)).astype(np.float32)
    x1y1 = rng.uniform(-5, 40, (k, 2))
    boxes = np.concatenate([x1y1, x1y1 + rng.uniform(1, 30, (k, 2))], 1)
    boxes[0, 2:] = boxes[0, :2]  # a zero-size box
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    got = paste_masks(probs, boxes, h, w, 0.5)
    for i in range(k):
        pasted, window = _do_paste_mask(torch.from_numpy(probs[i:i + 1, None]), torch.from_numpy(boxes[i:i + 1]),
                                        h, w, skip_empty=True)
        want = np.zeros((h, w), bool)
        want[window] = (pasted[0] >= 0.5).numpy()
        assert (got[i] == want).all(), i
    assert got.any()
