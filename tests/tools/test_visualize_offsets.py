"""tools/visualize_offsets.py and dcn_det.visualization on a detector: its layers, the PNG, bad input
(composition on hand-made offset maps: tests/test_visualization.py)."""
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image

from dcn_det import visualization as vis
from dcn_det.checkpoint import load_detector
from tests._helpers import CONFIG_DIR, GRID
from tools import visualize_offsets

DEMO = osp.join(CONFIG_DIR, 'shapes_r18_dcnv2.py')
PLAIN = osp.join(CONFIG_DIR, 'shapes_r18_plain.py')
# the demo's test pipeline at 128 px (a 128x96 image keeps its size) and fewer proposals: a faster test
SMALL = {'test_dataloader.dataset.pipeline.1.scale': (128, 128), 'model.test_cfg.rpn.max_per_img': 50}
SMALL_ARGS = ['--cfg-options', *(f'{k}={v}' for k, v in SMALL.items())]


# The detector and the command line.

@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A fresh checkpoint of the demo config (R18, DCNv2 in c3-c5) and a 128x96 image."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    root = tmp_path_factory.mktemp('vis')
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(DEMO).model)
    model.init_weights()
    torch.save({'state_dict': model.state_dict()}, root / 'tiny.pth')
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(root / 'image.png')
    return root


@pytest.fixture(scope='module')
def tiny_model(tiny):
    cfg = Config.fromfile(DEMO)
    cfg.merge_from_dict(SMALL)
    return load_detector(cfg, str(tiny / 'tiny.pth'))


def test_default_layers_are_the_last_three_in_forward_order(tiny_model):
    model = tiny_model
    assert list(vis.select_layers(model)) == ['backbone.layer3.1.conv2', 'backbone.layer4.0.conv2',
                                              'backbone.layer4.1.conv2']
    assert list(vis.select_layers(model, ['layer4.1.conv2', 'backbone.layer2.0.conv2'])) == [
        'backbone.layer4.1.conv2', 'backbone.layer2.0.conv2']


def test_fresh_model_samples_the_regular_grid_and_a_bias_shifts_it(tiny, tiny_model):
    import mmcv

    model = tiny_model
    image = mmcv.imread(str(tiny / 'image.png'))
    layers = vis.select_layers(model, ['backbone.layer4.0.conv2', 'backbone.layer4.1.conv2'])
    maps, result = vis.capture(model, image, layers)
    assert result.metainfo['scale_factor'] == (1.0, 1.0)
    assert [(m.name, m.in_stride, m.out_stride) for m in maps] == [
        ('backbone.layer4.0.conv2', 32, (32, 32)), ('backbone.layer4.1.conv2', 32, (32, 32))]
    unit = (1, 2)
    p = torch.tensor([32.0, 64.0], dtype=torch.float64)
    (p1, w1), (p2, w2) = vis.sampling_locations(maps, unit)
    assert torch.equal(p1, p + GRID * 32)
    assert torch.equal(p2, torch.stack([p + (a + b) * 32 for a in GRID for b in GRID]))
    assert torch.equal(w2, torch.full((81,), 0.25, dtype=torch.float64))  # sigmoid(0) twice

    saved = [layer.conv_offset.bias.detach().clone() for layer in layers.values()]
    try:
        for layer in layers.values():
            with torch.no_grad():
                layer.conv_offset.bias[0:18:2] = 1.0
                layer.conv_offset.bias[1:18:2] = 0.5
        maps, _ = vis.capture(model, image, layers)
    finally:  # the model is shared by this module's tests
        for layer, bias in zip(layers.values(), saved, strict=True):
            with torch.no_grad():
                layer.conv_offset.bias.copy_(bias)
    assert [m.mean_abs_offset() for m in maps] == [pytest.approx(1.25 ** 0.5 * 32)] * 2
    (q1, _), (q2, _) = vis.sampling_locations(maps, unit)
    shift = torch.tensor([1.0, 0.5], dtype=torch.float64) * 32
    assert torch.equal(q1, p1 + shift)
    assert torch.equal(q2, p2 + 2 * shift)


def test_cli_writes_a_png_of_the_composed_points(tiny, capsys):
    out = tiny / 'offsets.png'
    assert visualize_offsets.main([DEMO, str(tiny / 'tiny.pth'), str(tiny / 'image.png'), '--out', str(out),
                                   '--points', '64,48', '10,80', *SMALL_ARGS]) == str(out)
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == 'PNG' and img.width >= 500 and img.height >= 300
        pixels = np.asarray(img.convert('RGB'))
    assert pixels.std() > 10  # not a blank canvas
    stdout = capsys.readouterr().out
    for name, stride in (('layer3.1.conv2', 16), ('layer4.0.conv2', 32), ('layer4.1.conv2', 32)):
        assert f'backbone.{name}: output stride {stride}, mean |offset| 0.000 px, mean mask 0.500' in stdout
    assert stdout.count('729 sampling points') == 2


@pytest.mark.parametrize('extra, message', [
    (['--layers', 'backbone.layer4.7.conv2'],
     "'backbone.layer4.7.conv2' is not a deformable layer of this model; choose from "
     'backbone.layer2.0.conv2, backbone.layer2.1.conv2, '),
    (['--layers', 'layer4.1.conv2', 'backbone.layer4.1.conv2'],
     'layer backbone.layer4.1.conv2 is given twice'),
    (['--points', '128,10'], 'point 128,10 is outside the 128x96 image'),
    (['--out', 'offsets.jpg'], "--out 'offsets.jpg' must end in .png"),
], ids=['unknown-layer', 'layer-twice', 'point-outside', 'not-png'])
def test_bad_arguments_fail_in_one_line(tiny, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        visualize_offsets.main([DEMO, str(tiny / 'tiny.pth'), str(tiny / 'image.png'),
                                '--out', str(tiny / 'never.png'), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1
    assert not (tiny / 'never.png').exists()


def test_existing_out_is_refused_and_left_alone(tiny, capsys):
    out = tiny / 'taken.png'
    out.write_bytes(b'precious')
    with pytest.raises(SystemExit):
        visualize_offsets.main([DEMO, str(tiny / 'tiny.pth'), str(tiny / 'image.png'),
                                '--out', str(out)])
    assert f"error: '{out}' exists: remove it or choose another --out" in capsys.readouterr().err
    assert out.read_bytes() == b'precious'


@pytest.mark.parametrize('config, checkpoint, image, message', [
    ('{root}/missing.py', 'tiny.pth', 'image.png', "config '{root}/missing.py' does not exist"),
    (DEMO, 'missing.pth', 'image.png', "checkpoint '{root}/missing.pth' does not exist"),
    (DEMO, 'tiny.pth', 'missing.png', "image '{root}/missing.png' does not exist"),
    (DEMO, 'tiny.pth', 'tiny.pth', 'is not an image file that OpenCV can read'),
    (PLAIN, 'tiny.pth', 'image.png', 'the model has no deformable layer in its backbone'),
], ids=['config', 'checkpoint', 'image', 'image-not-image', 'no-dcn'])
def test_bad_files_fail_in_one_line(tiny, capsys, config, checkpoint, image, message):
    with pytest.raises(SystemExit):
        visualize_offsets.main([config.format(root=tiny), str(tiny / checkpoint), str(tiny / image),
                                '--out', str(tiny / 'never.png')])
    err = capsys.readouterr().err
    assert message.format(root=tiny) in err and err.count('\n') == 1
    assert not (tiny / 'never.png').exists()


def test_checkpoint_of_another_model_is_refused(tiny, capsys):
    state = torch.load(tiny / 'tiny.pth')['state_dict']
    del state['backbone.layer4.1.conv2.conv_offset.weight']
    torch.save({'state_dict': state}, tiny / 'partial.pth')
    with pytest.raises(SystemExit):
        visualize_offsets.main([DEMO, str(tiny / 'partial.pth'), str(tiny / 'image.png'),
                                '--out', str(tiny / 'never.png')])
    err = capsys.readouterr().err
    assert "does not belong to this config's model" in err and 'layer4.1.conv2.conv_offset.weight' in err
