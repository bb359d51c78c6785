import os.path as osp

import pytest
import torch
import torchvision
from mmdet.models.backbones import ResNet
from mmengine.config import Config
from mmengine.registry import init_default_scope

from dcn_det.models import DCNResNet
from tests._helpers import CONFIG_DIR, shrink_detector
from tools import export_backbone


def _detector_checkpoint(tmp_path, config='faster_rcnn_dcnv2.py'):
    from mmdet.registry import MODELS

    init_default_scope('mmdet')
    cfg = shrink_detector(Config.fromfile(osp.join(CONFIG_DIR, config)))
    model = MODELS.build(cfg.model)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if 'conv_offset' in name:
            torch.nn.init.normal_(p, std=0.1)
    path = str(tmp_path / 'det.pth')
    torch.save({'meta': {'cfg': cfg.pretty_text}, 'state_dict': model.state_dict()}, path)
    return path, model


def test_round_trip_into_our_backbone_and_mmdets(tmp_path, capsys):
    path, model = _detector_checkpoint(tmp_path)
    out = str(tmp_path / 'backbone.pth')
    export_backbone.main([path, out])
    printed = capsys.readouterr().out
    assert 'not exported: neck.' in printed and 'not exported: backbone.' not in printed
    saved = torch.load(out, map_location='cpu', weights_only=True)
    assert saved['meta']['dcn']['type'] == 'MDConv' and saved['meta']['dcn']['stages_with_dcn'] == [2, 3, 4]
    assert saved['meta']['dcn']['deform_groups'] == 1 and 'DCNResNet' in saved['meta']['config']
    expected = model.backbone.state_dict()
    ours = DCNResNet(depth=50, base_channels=8, init_cfg=dict(type='Pretrained', checkpoint=out))
    ours.init_weights()
    mmdet_resnet = ResNet(depth=50, base_channels=8, dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
                          stage_with_dcn=(False, True, True, True), init_cfg=dict(type='Pretrained', checkpoint=out))
    mmdet_resnet.init_weights()
    for loaded in (ours.state_dict(), mmdet_resnet.state_dict()):
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_torchvision_layout_loads_into_torchvision(tmp_path, capsys):
    backbone = DCNResNet(depth=18)
    path = str(tmp_path / 'det.pth')
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in backbone.state_dict().items()}}, path)
    out = str(tmp_path / 'tv.pth')
    export_backbone.main([path, out, '--layout', 'torchvision'])
    unmapped = [line for line in capsys.readouterr().out.splitlines() if line.startswith('not exported')]
    assert len(unmapped) == 12 and all('conv_offset' in line for line in unmapped)  # 6 layers x (w, b)
    tv = torchvision.models.resnet18()
    missing, unexpected = tv.load_state_dict(torch.load(out, weights_only=True)['state_dict'], strict=False)
    assert sorted(missing) == ['fc.bias', 'fc.weight'] and unexpected == []
    assert torch.equal(tv.layer3[1].conv2.weight, backbone.layer3[1].conv2.weight)


def test_refuses_to_overwrite_and_non_detector_checkpoints(tmp_path, capsys):
    path, _ = _detector_checkpoint(tmp_path, 'faster_rcnn_r50_fpn.py')
    out = tmp_path / 'exists.pth'
    out.write_bytes(b'keep')
    with pytest.raises(SystemExit) as e:
        export_backbone.main([path, str(out)])
    assert e.value.code == 2 and 'exists' in capsys.readouterr().err and out.read_bytes() == b'keep'
    plain = tmp_path / 'plain.pth'
    torch.save({'conv1.weight': torch.zeros(1)}, plain)
    with pytest.raises(SystemExit):
        export_backbone.main([str(plain), str(tmp_path / 'x.pth')])
    assert 'not a detector checkpoint' in capsys.readouterr().err
    assert not (tmp_path / 'x.pth').exists()


def test_plain_model_exports_without_dcn_layout(tmp_path, capsys):
    path, model = _detector_checkpoint(tmp_path, 'faster_rcnn_r50_fpn.py')
    out = str(tmp_path / 'b.pth')
    export_backbone.main([path, out])
    assert torch.load(out, weights_only=True)['meta']['dcn']['deformable_layers'] == []
    assert '0 deformable layers' in capsys.readouterr().out
