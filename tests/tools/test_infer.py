"""tools/infer.py and tools/test.py --onnx through their command lines, on a tiny generated dataset."""
import json
import os
import pickle

import cv2
import numpy as np
import pytest

from dcn_det.deploy import count_unmatched
from tests._helpers import tool, write_tiny_shapes_config
from tests.deploy._models import CLASSES, export_checkpoint_onnx, generate_tiny_val_data, refused, write_checkpoint

# every test needs `deployed`, a trained tiny model exported to ONNX
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def deployed(tmp_path_factory):
    """A tiny DCNv2 config on 3 generated val images, a random-weight checkpoint and its ONNX export."""
    root = tmp_path_factory.mktemp('infer')
    cfg_path = write_tiny_shapes_config(root / 'tiny.py', generate_tiny_val_data(root), CLASSES,
                                        base='shapes_r18_dcnv2.py', image_size=64,
                                        extra='model.update(test_cfg=dict(rcnn=dict(score_thr=0.0)))\n')
    ckpt = write_checkpoint(cfg_path, root / 'tiny.pth')
    return root, cfg_path, ckpt, export_checkpoint_onnx(cfg_path, ckpt, root / 'tiny.onnx')


def test_infer_pytorch_and_onnxruntime_find_the_same_objects_and_skip_bad_files(deployed, tmp_path):
    root, cfg, ckpt, onnx_path = deployed
    (tmp_path / 'broken.png').write_bytes(b'\x89PNG not really')
    inputs = [root / 'data' / 'val', tmp_path / 'broken.png', tmp_path / 'missing.jpg']
    reports = {}
    for runtime, extra in (('pytorch', []), ('onnxruntime', ['--onnx', onnx_path])):
        out = tmp_path / runtime
        run = tool('tools/infer.py', cfg, ckpt, *inputs, '--out-dir', out, '--score-thr', '0.2', *extra)
        assert run.returncode == 0, run.stderr
        assert 'skipped' in run.stderr and 'broken.png: not an image cv2 can decode' in run.stderr
        assert '3 images' in run.stdout and '2 skipped' in run.stdout
        report = json.loads((out / 'detections.json').read_text())
        assert report['runtime'] == runtime and report['complete'] and report['classes'] == list(CLASSES)
        assert [os.path.basename(s['file']) for s in report['skipped']] == ['broken.png', 'missing.jpg']
        assert 'no such file' in report['skipped'][1]['error']
        for image in report['images']:
            picture = cv2.imread(image['picture'])
            assert picture.shape == (image['height'], image['width'], 3)
            for det in image['detections']:
                assert det['score'] >= 0.2 and det['class'] == CLASSES[det['label']] and len(det['box']) == 4
        reports[runtime] = report
    assert sum(len(im['detections']) for im in reports['pytorch']['images']) > 0
    for a, b in zip(reports['pytorch']['images'], reports['onnxruntime']['images'], strict=True):
        a, b = detections(a), detections(b)
        assert len(a[1]) == len(b[1]) and not count_unmatched(a, b, score_tol=2e-4, box_tol=0.02)


def detections(image: dict) -> tuple:
    """(boxes, scores, labels) of one image's entry in detections.json."""
    dets = image['detections']
    return (np.array([d['box'] for d in dets], dtype=np.float32).reshape(-1, 4),
            np.array([d['score'] for d in dets], dtype=np.float32), np.array([d['label'] for d in dets]))


def test_infer_refuses_an_onnx_file_of_another_config_or_checkpoint(deployed, tmp_path, capsys):
    from tools.infer import main

    root, cfg, ckpt, onnx_path = deployed
    image = str(root / 'data' / 'val')
    other = write_tiny_shapes_config(tmp_path / 'other.py', root / 'data', ('cat', 'dog', 'bird'),
                                     base='shapes_r18_dcnv2.py', image_size=64)
    err = refused(main, other, ckpt, image, '--onnx', onnx_path, '--out-dir', tmp_path / 'a', capsys=capsys)
    assert (f"{onnx_path} was exported for classes (ellipse, triangle, star; 3 classes) but {other} has (cat, dog, "
            "bird; 3 classes)") in err
    bigger = write_tiny_shapes_config(tmp_path / 'bigger.py', root / 'data', CLASSES, base='shapes_r18_dcnv2.py',
                                      image_size=96)
    err = refused(main, bigger, ckpt, image, '--onnx', onnx_path, '--out-dir', tmp_path / 'b', capsys=capsys)
    assert f'{onnx_path} expects another input than {bigger} prepares (scale (64, 64) in the ONNX file, ' \
           '(96, 96) in the config)' in err
    retrained = write_checkpoint(cfg, tmp_path / 'retrained.pth')
    err = refused(main, cfg, retrained, image, '--onnx', onnx_path, '--out-dir', tmp_path / 'c', capsys=capsys)
    assert f'was exported from {ckpt} (sha256' in err and f'not from {retrained}' in err
    os.makedirs(tmp_path / 'full')
    (tmp_path / 'full' / 'x').write_text('')
    err = refused(main, cfg, ckpt, image, '--out-dir', tmp_path / 'full', capsys=capsys)
    assert 'is not empty: choose a new folder' in err
    assert not any((tmp_path / d).exists() for d in 'abc')


def test_test_py_evaluates_the_onnx_file_like_the_checkpoint(deployed, tmp_path):
    root, cfg, ckpt, onnx_path = deployed
    predictions = {}
    for runtime, extra in (('pytorch', []), ('onnxruntime', ['--onnx', onnx_path])):
        work, out = tmp_path / runtime, tmp_path / f'{runtime}.pkl'
        run = tool('tools/test.py', cfg, ckpt, '--work-dir', work, '--out', out, *extra)
        assert run.returncode == 0, run.stderr
        written = json.loads((work / 'test_metrics.json').read_text())
        assert written['onnx'] == (str(onnx_path) if extra else None) and 'coco/bbox_mAP' in written['metrics']
        predictions[runtime] = pickle.loads(out.read_bytes())
    assert len(predictions['pytorch']) == len(predictions['onnxruntime']) == 3
    for a, b in zip(predictions['pytorch'], predictions['onnxruntime'], strict=True):
        assert a['img_id'] == b['img_id']
        pa, pb = ((p['pred_instances'][k].numpy() for k in ('bboxes', 'scores', 'labels')) for p in (a, b))
        pa, pb = tuple(pa), tuple(pb)
        assert len(pa[1]) == len(pb[1]) > 10 and not count_unmatched(pa, pb, score_tol=1e-4, box_tol=0.02)


def test_test_py_refuses_a_mismatched_onnx_file_before_running(deployed, tmp_path, capsys):
    from tools.test import main

    root, cfg, ckpt, onnx_path = deployed
    other = write_tiny_shapes_config(tmp_path / 'other.py', root / 'data', ('cat', 'dog', 'bird'),
                                     base='shapes_r18_dcnv2.py', image_size=64)
    err = refused(main, other, ckpt, '--onnx', onnx_path, '--work-dir', tmp_path / 'w', capsys=capsys)
    assert f'{onnx_path} was exported for classes (ellipse, triangle, star; 3 classes)' in err
    err = refused(main, cfg, ckpt, '--onnx', tmp_path / 'nope.onnx', '--work-dir', tmp_path / 'w', capsys=capsys)
    assert "nope.onnx' does not exist" in err
