"""tools/export_openvino.py, tools/test.py --openvino and tools/infer.py --openvino through their command
lines, on a tiny generated dataset: PyTorch's detections, and one-line refusals."""
import json
import os
import pickle

import pytest

from dcn_det.deploy import count_unmatched
from tests._helpers import tool, write_tiny_shapes_config
from tests.deploy._models import CLASSES, generate_tiny_val_data, refused, write_checkpoint

# every test needs `deployed`, a tiny model exported by the tool
pytestmark = pytest.mark.slow
pytest.importorskip('openvino')


@pytest.fixture(scope='module')
def deployed(tmp_path_factory):
    """A tiny DCNv2 config on 3 generated val images, a random-weight checkpoint and its IR."""
    root = tmp_path_factory.mktemp('openvino')
    cfg = write_tiny_shapes_config(root / 'tiny.py', generate_tiny_val_data(root), CLASSES, base='shapes_r18_dcnv2.py',
                                   image_size=64, extra='model.update(test_cfg=dict(rcnn=dict(score_thr=0.0)))\n')
    ckpt = write_checkpoint(cfg, root / 'tiny.pth')
    xml = root / 'tiny.xml'
    run = tool('tools/export_openvino.py', cfg, ckpt, xml)
    assert run.returncode == 0, run.stderr
    assert 'input images[1x3x64x64], 3 classes' in run.stdout and 'DeformableConvolution' in run.stdout
    assert 'OpenVINO (f32) vs PyTorch on a test batch: same detections' in run.stdout
    assert sorted(os.listdir(root)) == ['data', 'tiny.bin', 'tiny.pth', 'tiny.py', 'tiny.xml']  # no temporary left
    return root, cfg, ckpt, xml


def test_test_py_evaluates_the_ir_like_the_checkpoint(deployed, tmp_path):
    root, cfg, ckpt, xml = deployed
    predictions = {}
    for runtime, extra in (('pytorch', []), ('openvino', ['--openvino', xml])):
        work, out = tmp_path / runtime, tmp_path / f'{runtime}.pkl'
        run = tool('tools/test.py', cfg, ckpt, '--work-dir', work, '--out', out, *extra)
        assert run.returncode == 0, run.stderr
        written = json.loads((work / 'test_metrics.json').read_text())
        assert written['openvino'] == (str(xml) if extra else None) and 'coco/bbox_mAP' in written['metrics']
        assert written['precision'] == ('f32' if extra else None)
        predictions[runtime] = pickle.loads(out.read_bytes())
    assert len(predictions['pytorch']) == len(predictions['openvino']) == 3
    for a, b in zip(predictions['pytorch'], predictions['openvino'], strict=True):
        assert a['img_id'] == b['img_id']
        pa, pb = (tuple(p['pred_instances'][k].numpy() for k in ('bboxes', 'scores', 'labels')) for p in (a, b))
        assert len(pa[1]) == len(pb[1]) > 10 and not count_unmatched(pa, pb, score_tol=1e-4, box_tol=0.02)


def test_infer_runs_the_ir(deployed, tmp_path):
    root, cfg, ckpt, xml = deployed
    out = tmp_path / 'out'
    run = tool('tools/infer.py', cfg, ckpt, root / 'data' / 'val', '--openvino', xml, '--out-dir', out,
               '--score-thr', '0', '--threads', '1')
    assert run.returncode == 0, run.stderr
    report = json.loads((out / 'detections.json').read_text())
    assert report['runtime'] == 'openvino f32' and report['openvino'] == str(xml) and report['complete']
    assert len(report['images']) == 3 and all(len(image['detections']) > 10 for image in report['images'])


@pytest.mark.parametrize('main_of', ['test', 'infer'])
def test_a_stale_ir_a_missing_bin_or_a_bad_precision_is_refused(deployed, tmp_path, capsys, main_of):
    import importlib

    main = importlib.import_module(f'tools.{main_of}').main
    root, cfg, ckpt, xml = deployed
    images = [root / 'data' / 'val'] if main_of == 'infer' else []

    def err(*args):
        return refused(main, cfg, ckpt, *images, *args, '--out-dir' if images else '--work-dir', tmp_path / 'w',
                       capsys=capsys)

    # the config now has another test-time threshold than the IR was built with
    stale = err('--openvino', xml, '--cfg-options', 'model.test_cfg.rcnn.score_thr=0.5')
    assert f'{xml} is stale: it was exported from {cfg} with another model section' in stale
    assert 'export it again with tools/export_openvino.py' in stale
    lone = tmp_path / 'lone.xml'
    lone.write_bytes(xml.read_bytes())
    assert f"'{tmp_path / 'lone.bin'}' is missing: an OpenVINO IR is {lone} plus its weights" in err('--openvino', lone)
    assert f"precision 'f16' for {xml}: use --precision f32" in err('--openvino', xml, '--precision', 'f16')
    assert '--precision bf16 sets OpenVINO' in err('--precision', 'bf16')
    assert '--onnx and --openvino: give one' in err('--openvino', xml, '--onnx', xml)
    assert not (tmp_path / 'w').exists()


def test_export_refuses_an_existing_ir_or_another_suffix(deployed, tmp_path, capsys):
    from tools.export_openvino import main

    root, cfg, ckpt, xml = deployed
    before = xml.read_bytes()
    assert f"'{xml}' exists: remove it" in refused(main, cfg, ckpt, xml, capsys=capsys)
    assert "must end in .xml" in refused(main, cfg, ckpt, tmp_path / 'x.onnx', capsys=capsys)
    assert xml.read_bytes() == before and not os.listdir(tmp_path)
