"""tools/infer.py and tools/test.py (PyTorch and --onnx) on a Mask R-CNN and a Cascade Mask R-CNN config, on a
tiny generated dataset."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tests._helpers import tool, write_tiny_shapes_config
from tests.deploy._models import (
    CLASSES,
    NO_CUTOFF,
    export_checkpoint_onnx,
    generate_tiny_val_data,
    tiny_config,
    write_checkpoint,
)

pytestmark = pytest.mark.slow  # a tiny Mask R-CNN and a Cascade Mask R-CNN exported to ONNX, then four tool runs each

# the mask head at the tiny config's 16-channel width
TINY_MASK_HEAD = """
model['roi_head'].update(mask_roi_extractor=dict(out_channels=16),
                         mask_head=dict(in_channels=16, conv_out_channels=16, num_classes=len(classes)))
model.update(test_cfg=dict(rcnn=dict(score_thr=0.0)))
"""


def tiny_cascade_config(path, data_root) -> str:
    """configs/cascade_mask_rcnn_dcnv2.py shrunk (R50 at 8 base channels), testing on the tiny dataset. Random
    weights score the three stages' mean logits almost alike: nothing is cut at max_per_img, where ties would meet."""
    cfg = tiny_config('cascade_mask_rcnn_dcnv2.py', image_size=64, **NO_CUTOFF)
    ann_file = 'annotations/instances_val.json'
    cfg.test_dataloader.dataset.update(data_root=f'{data_root}/', ann_file=ann_file, data_prefix=dict(img='val/'),
                                       metainfo=dict(classes=CLASSES))
    cfg.test_evaluator.ann_file = f'{data_root}/{ann_file}'
    cfg.dump(str(path))
    return str(path)


@pytest.fixture(scope='module', params=['mask_rcnn', 'cascade_mask_rcnn'])
def deployed(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    data = generate_tiny_val_data(root)
    if request.param == 'mask_rcnn':
        cfg_path = write_tiny_shapes_config(root / 'tiny.py', data, CLASSES, base='shapes_r18_mask_dcnv2.py',
                                            image_size=64, extra=TINY_MASK_HEAD)
    else:
        cfg_path = tiny_cascade_config(root / 'tiny.py', data)
    ckpt = write_checkpoint(cfg_path, root / 'tiny.pth')
    return root, cfg_path, ckpt, export_checkpoint_onnx(cfg_path, ckpt, root / 'tiny.onnx')


def test_infer_writes_rle_masks_and_draws_them(deployed, tmp_path):
    root, cfg, ckpt, onnx_path = deployed
    masks = {}
    for runtime, extra in (('pytorch', []), ('onnxruntime', ['--onnx', onnx_path])):
        out = tmp_path / runtime
        run = tool('tools/infer.py', cfg, ckpt, root / 'data' / 'val', '--out-dir', out, '--score-thr', '0.2', *extra)
        assert run.returncode == 0, run.stderr
        report = json.loads((out / 'detections.json').read_text())
        decoded = []
        for image in report['images']:
            for det in image['detections']:
                rle = det['mask']
                assert rle['size'] == [image['height'], image['width']] and isinstance(rle['counts'], str)
                m = mask_utils.decode({'size': rle['size'], 'counts': rle['counts'].encode()}).astype(bool)
                x1, y1, x2, y2 = det['box']
                ys, xs = np.nonzero(m)  # pasted inside the box grown by mmdet's one-pixel margin
                assert not xs.size or (xs.min() >= x1 - 2 and xs.max() <= x2 + 1 and ys.min() >= y1 - 2
                                       and ys.max() <= y2 + 1)
                decoded.append(m)
        masks[runtime] = decoded
    assert len(masks['pytorch']) == len(masks['onnxruntime']) > 0 and any(m.any() for m in masks['pytorch'])
    pixels = sum(m.size for m in masks['pytorch'])
    assert sum((a != b).sum() for a, b in zip(masks['pytorch'], masks['onnxruntime'], strict=True)) <= 1e-3 * pixels


def test_test_py_reports_mask_ap_for_the_checkpoint_and_the_onnx_file(deployed, tmp_path):
    root, cfg, ckpt, onnx_path = deployed
    metrics = {}
    for runtime, extra in (('pytorch', []), ('onnxruntime', ['--onnx', onnx_path])):
        run = tool('tools/test.py', cfg, ckpt, '--work-dir', tmp_path / runtime, *extra)
        assert run.returncode == 0, run.stderr
        assert 'segm_mAP ' in run.stdout and 'bbox_mAP ' in run.stdout
        metrics[runtime] = json.loads((tmp_path / runtime / 'test_metrics.json').read_text())['metrics']
    for key in ('coco/bbox_mAP', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        assert abs(metrics['pytorch'][key] - metrics['onnxruntime'][key]) <= 0.005, key
