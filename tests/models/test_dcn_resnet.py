import pytest
import torch
from mmdet.models.backbones import ResNet
from torch import nn

from dcn_det.models import DCNResNet, DeformConv2dPack, ModulatedDeformConv2dPack
from dcn_det.models.backbones import DCN_LAYERS


def _randomise_offsets(model, scale=0.3):
    torch.manual_seed(1)
    for m in model.modules():
        if hasattr(m, 'conv_offset'):
            nn.init.normal_(m.conv_offset.weight, std=scale)
            nn.init.normal_(m.conv_offset.bias, std=scale)


def _conv2s(model):
    return {name: m for name, m in model.named_modules() if name.endswith('conv2') and 'layer' in name}


def test_docstring_example_shapes():
    model = DCNResNet(depth=18).eval()
    outs = model(torch.rand(1, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 8, 8), (1, 128, 4, 4), (1, 256, 2, 2), (1, 512, 1, 1)]


def test_default_is_dcnv2_in_c3_to_c5():
    model = DCNResNet(depth=50)
    for name, conv in _conv2s(model).items():
        expected = ModulatedDeformConv2dPack if not name.startswith('layer1') else nn.Conv2d
        assert type(conv) is expected, name
        if expected is ModulatedDeformConv2dPack:
            assert conv.deform_groups == 1


def test_loads_mmdet_dcnv2_resnet_strictly_and_matches_its_features():
    kwargs = dict(depth=50, base_channels=16, norm_eval=False)
    mmdet_model = ResNet(dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
                         stage_with_dcn=(False, True, True, True), **kwargs)
    mmdet_model.init_weights()
    _randomise_offsets(mmdet_model)
    ours = DCNResNet(**kwargs)
    assert set(ours.state_dict()) == set(mmdet_model.state_dict())
    ours.load_state_dict(mmdet_model.state_dict(), strict=True)
    x = torch.rand(2, 3, 64, 64)
    mmdet_model.eval(), ours.eval()
    with torch.no_grad():
        for a, b in zip(mmdet_model(x), ours(x), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_fallback_on_stride_applies_to_every_block():
    # mmdet pops the flag from the dict shared by a stage's blocks: only its first block sees it.
    model = DCNResNet(depth=50, dcn=dict(type='MDConv', fallback_on_stride=True))
    for name, conv in _conv2s(model).items():
        strided = name.endswith('.0.conv2') and not name.startswith('layer1')
        dense = strided or name.startswith('layer1')
        assert isinstance(conv, nn.Conv2d) == dense, name


@pytest.mark.parametrize('dcn_type,cls', [('MDConv', ModulatedDeformConv2dPack), ('DCNv2', ModulatedDeformConv2dPack),
                                          ('DConv', DeformConv2dPack), ('DCN', DeformConv2dPack)])
def test_basic_block_takes_dcn(dcn_type, cls):
    model = DCNResNet(depth=18, dcn=dict(type=dcn_type, deform_groups=2, backend='native'))
    convs = _conv2s(model)
    assert type(convs['layer3.1.conv2']) is cls and convs['layer3.1.conv2'].deform_groups == 2
    assert type(convs['layer1.0.conv2']) is nn.Conv2d


def test_fresh_modulated_block_conv_is_half_the_dense_conv():
    conv = DCNResNet(depth=18).layer2[1].conv2
    x = torch.rand(1, 128, 8, 8)
    dense = nn.functional.conv2d(x, conv.weight, padding=1)
    torch.testing.assert_close(conv(x), 0.5 * dense, rtol=1e-5, atol=1e-5)


def test_zero_init_residual_still_applies():
    for depth, norm in ((18, 'norm2'), (50, 'norm3')):
        model = DCNResNet(depth=depth, base_channels=8)
        model.init_weights()
        assert all(getattr(b, norm).weight.abs().sum() == 0 for b in model.layer3)
        assert all(m.conv_offset.weight.abs().sum() == 0 for m in model.modules() if hasattr(m, 'conv_offset'))


def test_pretrained_plain_resnet_loads_and_dcnv1_equals_plain(tmp_path):
    import torchvision

    from dcn_det.models.backbones import dcn_resnet

    tv = torchvision.models.resnet18()
    path = str(tmp_path / 'resnet18_tv.pth')
    torch.save(tv.state_dict(), path)  # torchvision layout, classifier included
    model = DCNResNet(depth=18, dcn=dict(type='DConv'), init_cfg=dict(type='Pretrained', checkpoint=path))
    messages = []
    orig = dcn_resnet.print_log
    dcn_resnet.print_log = lambda msg, **kw: messages.append(msg)
    try:
        model.init_weights()
    finally:
        dcn_resnet.print_log = orig
    assert len(messages) == 1 and '6 deformable layers' in messages[0] and 'zero offsets' in messages[0]
    plain = ResNet(depth=18)
    plain.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith('fc.')})
    x = torch.rand(1, 3, 64, 64)
    model.eval(), plain.eval()
    with torch.no_grad():
        for a, b in zip(plain(x), model(x), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_pretrained_detector_checkpoint_with_prefix(tmp_path):
    src = DCNResNet(depth=18, base_channels=8)
    _randomise_offsets(src)
    path = str(tmp_path / 'det.pth')
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in src.state_dict().items()}}, path)
    model = DCNResNet(depth=18, base_channels=8,
                      init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    model.init_weights()
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_pretrained_rules(tmp_path):
    missing = DCNResNet(depth=18, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'nope.pth')))
    with pytest.raises(FileNotFoundError, match='init_cfg=None'):
        missing.init_weights()
    wrong = str(tmp_path / 'r50.pth')
    torch.save(ResNet(depth=50, base_channels=8).state_dict(), wrong)
    model = DCNResNet(depth=18, base_channels=8, init_cfg=dict(type='Pretrained', checkpoint=wrong))
    with pytest.raises(KeyError, match='not a ResNet-18 checkpoint'):
        model.init_weights()


def test_argument_errors_name_the_fix():
    with pytest.raises(ValueError, match=r'depth must be one of \[18, 34, 50, 101, 152\]'):
        DCNResNet(depth=20)
    with pytest.raises(ValueError, match="'MDConv'/'DCNv2' = modulated"):
        DCNResNet(depth=18, dcn=dict(type='Deformable'))
    with pytest.raises(ValueError, match='one flag per stage'):
        DCNResNet(depth=18, stage_with_dcn=(False, True))
    with pytest.raises(TypeError, match="dict with a 'type'"):
        DCNResNet(depth=18, dcn='MDConv')


def test_frozen_stages_and_norm_eval_as_mmdet():
    model = DCNResNet(depth=18, frozen_stages=1, norm_eval=True)
    model.train()
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize('dcn_type', ['MDConv', 'DConv'])
def test_offset_lr_mult_reaches_conv_offset(dcn_type):
    """mmengine's dcn_offset_lr_mult finds the layers' conv_offset (they are mmcv's packs), and only it."""
    from mmengine.optim import build_optim_wrapper

    model = DCNResNet(depth=18, base_channels=8, dcn=dict(type=dcn_type))
    wrapper = build_optim_wrapper(model, dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.02),
                                              paramwise_cfg=dict(dcn_offset_lr_mult=0.1)))
    ids = {id(p): n for n, p in model.named_parameters()}
    lrs = {ids[id(p)]: g['lr'] for g in wrapper.optimizer.param_groups for p in g['params']}
    assert set(lrs) == set(ids.values()) and 'layer3.0.conv2.conv_offset.weight' in lrs
    for name, lr in lrs.items():
        assert lr == pytest.approx(0.002 if '.conv_offset.' in name else 0.02), name


def test_dcn_types_are_the_registered_names_and_mmdets():
    from mmdet.registry import MODELS

    assert DCN_LAYERS == {'MDConv': MODELS.get('MDConv'), 'DConv': MODELS.get('DConv'),
                          'DCNv2': ModulatedDeformConv2dPack, 'DCN': DeformConv2dPack}
    assert MODELS.get('MDConv') is ModulatedDeformConv2dPack and MODELS.get('DConv') is DeformConv2dPack


def test_channels_last_computes_the_same_and_returns_nchw():
    # mmcv's CPU RoIAlign reads raw NCHW memory (a channels-last map gives other values): the backbone's
    # channels-last layout must stay inside it
    torch.manual_seed(0)
    model = DCNResNet(depth=18, base_channels=8)
    _randomise_offsets(model, scale=0.1)
    fast = DCNResNet(depth=18, base_channels=8, channels_last=True)
    fast.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 64, 64)
    seen = []
    fast.layer3.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    outs, fast_outs = model.eval()(x), fast.eval()(x)  # float32 rounding differs by layout: to 1e-4 of scale
    for out, fast_out in zip(outs, fast_outs, strict=True):
        assert fast_out.is_contiguous() and not fast_out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(fast_out, out, rtol=0, atol=1e-4 * out.abs().max().item())
    assert seen == [True]  # inside, the layers ran channels-last
    sum(o.square().sum() for o in outs).backward()
    sum(o.square().sum() for o in fast_outs).backward()
    for (name, p), q in zip(model.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-3 * p.grad.abs().max().item() + 1e-12,
                                   msg=name)
