"""tools/export_onnx.py through its command line: a file that runs, and one-line refusals."""
import json
import re

import onnx
import pytest

from dcn_det.deploy import META
from dcn_det.deploy.metadata import file_sha256
from tests._helpers import tool, write_tiny_shapes_config
from tests.deploy._models import CLASSES, refused, write_checkpoint


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('export')
    cfg = write_tiny_shapes_config(root / 'tiny.py', root / 'data', CLASSES, base='shapes_r18_plain.py', image_size=64)
    return cfg, write_checkpoint(cfg, root / 'tiny.pth')


@pytest.mark.slow  # a full export, verified in onnxruntime
def test_exports_a_verified_file_with_its_metadata(tiny, tmp_path):
    cfg, ckpt = tiny
    out = tmp_path / 'tiny.onnx'
    run = tool('tools/export_onnx.py', cfg, ckpt, out)
    assert run.returncode == 0, run.stderr
    assert 'opset 19, input images[1x3x64x64], 3 classes' in run.stdout
    assert 'onnxruntime vs PyTorch on a test batch: same detections' in run.stdout
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta[META['classes']]) == list(CLASSES)
    assert meta[META['config_path']] == cfg and meta[META['checkpoint_sha256']] == file_sha256(str(ckpt))
    assert "'triangle'" in meta[META['config']] and "type='DCNResNet'" in meta[META['config']]


@pytest.mark.parametrize('extra, message', [
    (['--opset', '18'],
     r"^error: opset 18 is too old: ONNX has DeformConv .* only from opset 19; .* Use --opset 19 or newer"),
    (['--dynamic', '--batch-size', '2'], r'^error: --dynamic leaves batch size and shape free'),
    (['--shape', '100', '64'], r"^error: --shape 100 64: height and width must be multiples .* --shape 128 64"),
])
def test_bad_options_are_refused_in_one_line(tiny, tmp_path, extra, message, capsys):
    from tools.export_onnx import main

    cfg, ckpt = tiny
    err = refused(main, cfg, ckpt, tmp_path / 'x.onnx', *extra, capsys=capsys)
    assert re.search(message, err), err
    assert not (tmp_path / 'x.onnx').exists()


def test_an_existing_output_is_never_overwritten(tiny, tmp_path, capsys):
    from tools.export_onnx import main

    cfg, ckpt = tiny
    (tmp_path / 'x.onnx').write_text('keep me')
    err = refused(main, cfg, ckpt, tmp_path / 'x.onnx', capsys=capsys)
    assert "x.onnx' exists: remove it or choose another output path" in err
    assert (tmp_path / 'x.onnx').read_text() == 'keep me'


def test_mmcvs_layers_export_converted_and_are_named_with_keep_mmcv_ops(tmp_path, capsys):
    from tools.export_onnx import main

    # mmdet's own ResNet with DCNv2 builds mmcv's compiled layer (R50: mmdet refuses DCN in R18 blocks)
    cfg = write_tiny_shapes_config(
        tmp_path / 'mmcv_dcn.py', tmp_path / 'data', CLASSES, base='shapes_r18_plain.py', image_size=64,
        extra="model['backbone'] = dict(_delete_=True, type='mmdet.ResNet', depth=50, base_channels=8, "
              "init_cfg=None, stage_with_dcn=(False, True, True, True), dcn=dict(type='DCNv2', deform_groups=1))\n"
              "model['neck'].update(in_channels=[32, 64, 128, 256])\n")
    ckpt = write_checkpoint(cfg, tmp_path / 'm.pth')
    err = refused(main, cfg, ckpt, tmp_path / 'x.onnx', '--keep-mmcv-ops', capsys=capsys)
    assert ("error: cannot export backbone.layer2.0.conv2 (ModulatedDeformConv2dPack): mmcv's compiled op cannot be "
            "traced by the exporter; convert the model first with dcn_det.convert_mmcv_ops(model)") in err
    result = main([str(cfg), str(ckpt), str(tmp_path / 'y.onnx'), '--no-verify'])  # converted by default
    assert 'DeformConv' in result.op_types
