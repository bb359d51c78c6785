import pytest
import torch
import torchvision

from dcn_det.models import DCNResNet
from tools import convert_torchvision_resnet


def test_converted_torchvision_weights_feed_the_config_init(tmp_path, capsys):
    tv = torchvision.models.resnet18()
    src, dst = tmp_path / 'tv.pth', tmp_path / 'pretrained' / 'r18.pth'
    torch.save(tv.state_dict(), src)
    convert_torchvision_resnet.main([str(src), str(dst)])
    assert capsys.readouterr().out.splitlines()[:2] == ['not converted: fc.weight', 'not converted: fc.bias']
    model = DCNResNet(depth=18, init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    model.init_weights()
    assert torch.equal(model.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)


def test_refuses_non_resnet_and_existing_output(tmp_path, capsys):
    src = tmp_path / 'x.pth'
    torch.save({'weight': torch.zeros(1)}, src)
    with pytest.raises(SystemExit):
        convert_torchvision_resnet.main([str(src), str(tmp_path / 'y.pth')])
    assert 'not a torchvision ResNet' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_torchvision_resnet.main([str(src), str(src)])
    assert 'exists' in capsys.readouterr().err
