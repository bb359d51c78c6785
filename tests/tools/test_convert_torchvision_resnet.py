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


@pytest.mark.parametrize('prefix', ['module.', 'module.pre.'])
def test_finds_the_resnet_under_a_wrapper_prefix_and_names_it(tmp_path, capsys, prefix):
    """Rule: a ResNet saved by DDP (``module.``) or inside a self-supervised model converts, prefix stripped."""
    tv = torchvision.models.resnet18()
    state = {prefix + k: v for k, v in tv.state_dict().items()}
    state['module.head.weight'] = torch.zeros(3)  # outside the ResNet: reported, not converted
    src, dst = tmp_path / 'ssl.pth', tmp_path / 'r18.pth'
    torch.save({'state_dict': state}, src)
    convert_torchvision_resnet.main([str(src), str(dst)])
    out = capsys.readouterr().out
    assert f"stripped the prefix '{prefix}'" in out and 'not converted: module.head.weight' in out
    converted = torch.load(dst, weights_only=True)
    assert converted['meta']['stripped_prefix'] == prefix
    model = DCNResNet(depth=18, init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    model.init_weights()
    assert torch.equal(model.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    assert not [k for k in converted['state_dict'] if k.startswith(('module.', 'fc.'))]


def test_several_resnets_need_prefix_and_a_wrong_prefix_is_refused(tmp_path, capsys):
    tv = torchvision.models.resnet18().state_dict()
    state = {f'module.encoder_{q}.{k}': v for q in 'qk' for k, v in tv.items()}
    src = tmp_path / 'moco.pth'
    torch.save(state, src)
    with pytest.raises(SystemExit):
        convert_torchvision_resnet.main([str(src), str(tmp_path / 'a.pth')])
    err = capsys.readouterr().err
    assert "'module.encoder_k.', 'module.encoder_q.'" in err and '--prefix' in err and err.count('\n') == 1
    with pytest.raises(SystemExit):
        convert_torchvision_resnet.main([str(src), str(tmp_path / 'a.pth'), '--prefix', 'module.'])
    assert "no ResNet under --prefix 'module.'" in capsys.readouterr().err
    convert_torchvision_resnet.main([str(src), str(tmp_path / 'a.pth'), '--prefix', 'module.encoder_q.'])
    out = capsys.readouterr().out
    assert out.count('not converted: module.encoder_k.') == len(tv)


def test_a_layer_key_is_not_mistaken_for_a_prefix():
    # 'layer1.0.conv1.weight' ends with 'conv1.weight' but 'layer1.0.' holds no ResNet
    state = torchvision.models.resnet18().state_dict()
    assert convert_torchvision_resnet.resnet_prefixes(state) == ['']
    assert convert_torchvision_resnet.resnet_prefixes({'xconv1.weight': 0, 'xlayer1.0.conv1.weight': 0}) == []
