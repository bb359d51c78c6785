"""Deformable RoI pooling: a hand-checkable golden case, torchvision's aligned RoIAlign, chunking, precision,
the modules. What every backend must pass alike (the float64 reference, mmcv's published numbers, gradcheck,
layouts, argument rules) is in tests/ops/test_conformance.py."""
import importlib

import pytest
import torch
from torchvision.ops import roi_align

from dcn_det.ops import DeformRoIPool, ModulatedDeformRoIPool, RoIOffsetPredictor, deform_roi_pool
from tests.ops._reference import random_case, torchvision_safe
from tests.ops._reference import roi_reference as reference

# the module (its name is also the function's, which `from dcn_det.ops import` gives)
pool_ops = importlib.import_module('dcn_det.ops.deform_roi_pool')

# ----------------------------------------------------------------------------------------------
# values


def test_golden_arange():
    # Feature value at (y, x) is 5y + x; bilinear interpolation is exact on it, so a bin's value is
    # 5 * mean(sample y) + mean(sample x) over its samples (0 for a sample off the map).
    # RoI (0.5, 0.5, 4.5, 4.5) -> (0, 0, 4, 4) after the -0.5 shift: 2x2 bins of 2 px, adaptive grid
    # ceil(4 / 2) = 2, so samples sit at bin start + 0.5 and + 1.5 on each axis; gamma * roi size is
    # 0.1 * 4 = 0.4 px per unit of offset.
    # RoI 0, offset (x 0.25, y 0.5): shift (+0.1, +0.2). Bin (i, j): y in {2i+.7, 2i+1.7},
    #   x in {2j+.6, 2j+1.6}: 5 (2i + 1.2) + (2j + 1.1) = 10i + 2j + 7.1.
    # RoI 1, offset (x 2, y -1.5): shift (+0.8, -0.6). y in {2i-.1, 2i+.9}, x in {2j+1.3, 2j+2.3};
    #   y = -0.1 clamps to 0 (mean 0.45 for i = 0, 2.4 for i = 1), x = 4.3 clamps to 4 (mean 3.65 for
    #   j = 1, 1.8 for j = 0): [[2.25 + 1.8, 2.25 + 3.65], [12 + 1.8, 12 + 3.65]].
    # RoI 2, offset (x 5, y 0): shift (+2, 0). y in {2i+.5, 2i+1.5} (mean 2i + 1); j = 0: x in
    #   {2.5, 3.5} -> 5 (2i + 1) + 3; j = 1: x = 4.5 clamps to 4, x = 5.5 > W is off the map (0), so
    #   ((5 (2i + .5) + 4) + (5 (2i + 1.5) + 4)) / 4 = (20i + 18) / 4.
    input = torch.arange(25.).view(1, 1, 5, 5)
    rois = torch.tensor([[0, 0.5, 0.5, 4.5, 4.5]] * 3)
    offset = torch.tensor([[0.25, 0.5], [2.0, -1.5], [5.0, 0.0]]).view(3, 2, 1, 1).expand(3, 2, 2, 2)
    expected = torch.tensor([[[7.1, 9.1], [17.1, 19.1]],
                             [[4.05, 5.9], [13.8, 15.65]],
                             [[8.0, 4.5], [18.0, 9.5]]]).view(3, 1, 2, 2)
    out = deform_roi_pool(input, rois, offset, 2, 1.0, 0, 0.1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, reference(input, rois, offset, (2, 2), 1.0, 0, 0.1).float())

    # the same RoI 0 through the DCNv2 module: offsets from the fc bias, mask sigmoid(0) = 0.5
    pool = ModulatedDeformRoIPool(2, 1, deform_fc_channels=4, backend='native')
    with torch.no_grad():
        pool.offset_fc[-1].bias.copy_(torch.tensor([0.25] * 4 + [0.5] * 4))
    torch.testing.assert_close(pool(input, rois[:1]), 0.5 * expected[:1])


@pytest.mark.parametrize('sampling_ratio', [0, 2])
def test_zero_offset_is_aligned_roi_align(sampling_ratio):
    input, rois, _ = random_case(1, c=5, h=16, w=12, k=20, output_size=(7, 7), dtype=torch.float32)
    rois = torchvision_safe(rois)
    input.requires_grad_(True)
    expected = roi_align(input, rois, (7, 7), 0.25, sampling_ratio, aligned=True)
    zero = torch.zeros(len(rois), 2, 7, 7, requires_grad=True)
    for offset in (None, zero):
        out = deform_roi_pool(input, rois, offset, 7, 0.25, sampling_ratio)
        torch.testing.assert_close(out, expected)
        grad = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, input, grad)[0],
                                   torch.autograd.grad(expected, input, grad, retain_graph=True)[0])


def test_module_with_no_rois():
    pool = ModulatedDeformRoIPool(7, 3, deform_fc_channels=8, spatial_scale=0.5)
    assert pool(torch.randn(2, 3, 8, 8), torch.zeros(0, 5)).shape == (0, 3, 7, 7)


def test_image_without_rois():
    input, rois, offset = random_case(3, dtype=torch.float32)  # RoIs on images 0 and 2 only
    input.requires_grad_(True)
    out = deform_roi_pool(input, rois, offset, (3, 2), 0.25)
    out.backward(torch.randn_like(out))
    assert not input.grad[1].any() and input.grad[0].any() and input.grad[2].any()
    pair = input.detach()[[0, 2]]
    remapped = torch.cat([rois[:, :1] / 2, rois[:, 1:]], 1)
    torch.testing.assert_close(out, deform_roi_pool(pair, remapped, offset, (3, 2), 0.25))


def test_chunked_equals_unchunked(monkeypatch):
    input, rois, offset = random_case(5, k=12, dtype=torch.float64)
    input.requires_grad_(True)
    offset.requires_grad_(True)
    results = []
    for entries in (pool_ops.CHUNK_ENTRIES, 40):  # 40 entries: chunks of one or two RoIs
        monkeypatch.setattr(pool_ops, 'CHUNK_ENTRIES', entries)
        out = deform_roi_pool(input, rois, offset, (3, 2), 0.25)
        grads = torch.autograd.grad(out, (input, offset), torch.arange(out.numel()).view_as(out).double())
        results.append((out, *grads))
    assert len(pool_ops._plan(rois, offset.detach(), pool_ops.Params(3, 2, 0.25, 0, 0.1), 3, 9, 11)) >= 7
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    input, rois, offset = random_case(6, dtype=torch.float32)
    expected = deform_roi_pool(input, rois, offset, (3, 2), 0.25)
    x = input.to(dtype).requires_grad_(True)
    out = deform_roi_pool(x, rois, offset.to(dtype), (3, 2), 0.25)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=0.02, atol=0.02)
    out.float().sum().backward()
    assert x.grad.dtype == dtype


# ----------------------------------------------------------------------------------------------
# modules


def test_module_under_autocast():
    input, rois, _ = random_case(12, c=4, dtype=torch.float32)
    pool = ModulatedDeformRoIPool((3, 2), 4, deform_fc_channels=16, spatial_scale=0.25)
    torch.nn.init.normal_(pool.offset_fc[-1].weight)
    expected = pool(input, rois)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # the fc layers give bfloat16 offsets and mask
        out = pool(input, rois)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)


def test_bf16_features_under_autocast_pool_in_float32():
    """A bfloat16 backbone's features under CPU bfloat16 autocast: pooled in float32, as exactly as their
    float32 copy (what a detector trained with --amp feeds the op)."""
    input, rois, offset = random_case(13, c=8, dtype=torch.float32)
    low = input.bfloat16()
    expected = deform_roi_pool(low.float(), rois, offset, (3, 2), 0.25)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = deform_roi_pool(low, rois, offset.bfloat16(), (3, 2), 0.25)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, deform_roi_pool(low.float(), rois, offset.bfloat16().float(), (3, 2), 0.25))
    assert (out - expected).abs().max() < 0.05 * expected.abs().max()


def test_fresh_modules_are_roi_align():
    input, rois, _ = random_case(7, c=4, dtype=torch.float32)
    rois = torchvision_safe(rois)
    expected = roi_align(input, rois, (3, 2), 0.25, 0, aligned=True)
    pool = DeformRoIPool((3, 2), 4, deform_fc_channels=16, spatial_scale=0.25)
    mpool = ModulatedDeformRoIPool((3, 2), 4, deform_fc_channels=16, spatial_scale=0.25)
    torch.testing.assert_close(pool(input, rois), expected)
    torch.testing.assert_close(mpool(input, rois), 0.5 * expected)


@pytest.mark.parametrize('cls', [DeformRoIPool, ModulatedDeformRoIPool])
def test_gradient_reaches_zero_initialised_offset_fc(cls):
    input, rois, _ = random_case(8, c=4, dtype=torch.float32)
    pool = cls((3, 2), 4, deform_fc_channels=16, spatial_scale=0.25)
    assert not pool.offset_fc[-1].weight.any()
    pool(input, rois).square().sum().backward()
    assert pool.offset_fc[-1].weight.grad.abs().sum() > 0
    assert pool.offset_fc[-1].bias.grad.abs().sum() > 0
    if cls is ModulatedDeformRoIPool:
        assert pool.mask_fc[2].weight.grad.abs().sum() > 0


def test_shared_predictor():
    """Layers built with own_predictor=False hold no parameters and pool with the predictor their owner passes:
    the output of a layer that owns the same weights, and the gradient of every layer's output reaches it."""
    torch.manual_seed(0)
    predictor = RoIOffsetPredictor(7, 8, deform_fc_channels=16, modulated=True)
    for stack in (predictor.offset_fc, predictor.mask_fc):  # away from the zero init: offsets and masks vary
        torch.nn.init.normal_([m for m in stack if isinstance(m, torch.nn.Linear)][-1].weight, std=0.01)
    levels = [ModulatedDeformRoIPool(7, 8, deform_fc_channels=16, spatial_scale=s, own_predictor=False)
              for s in (1 / 4, 1 / 8)]
    assert not [p for layer in levels for p in layer.parameters()]
    owner = ModulatedDeformRoIPool(7, 8, deform_fc_channels=16, spatial_scale=1 / 4)
    owner.load_state_dict(predictor.state_dict(), strict=True)
    feats = [torch.rand(1, 8, 32, 32), torch.rand(1, 8, 16, 16)]
    rois = torch.tensor([[0, 2., 3., 60., 50.], [0, 10., 10., 100., 90.]])
    torch.testing.assert_close(levels[0](feats[0], rois, predictor), owner(feats[0], rois))
    for layer, feat in zip(levels, feats, strict=True):
        grads = torch.autograd.grad(layer(feat, rois, predictor).sum(),
                                    [predictor.offset_fc[0].weight, predictor.mask_fc[0].weight])
        assert all(g.abs().sum() > 0 for g in grads), layer.spatial_scale


@pytest.mark.parametrize('ours, theirs', [(DeformRoIPool, 'DeformRoIPoolPack'),
                                          (ModulatedDeformRoIPool, 'ModulatedDeformRoIPoolPack')])
def test_loads_mmcv_pack_state_dict(ours, theirs):
    import mmcv.ops

    src = getattr(mmcv.ops, theirs)(7, 16, deform_fc_channels=32, spatial_scale=0.25)
    for p in src.parameters():
        torch.nn.init.normal_(p)
    dst = ours(7, 16, deform_fc_channels=32, spatial_scale=0.25)
    assert dst.load_state_dict(src.state_dict(), strict=True)  # raises on any missing/unexpected key
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value)


# ----------------------------------------------------------------------------------------------
# argument checks


def test_backend_rules():
    args = dict(input=torch.zeros(2, 3, 8, 8), rois=torch.tensor([[0, 1., 1, 9, 9]]), offset=torch.zeros(1, 2, 7, 7),
                output_size=7)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'native', 'mmcv', 'torchvision'\)"):
        deform_roi_pool(**args, backend='cuda')
    with pytest.raises(ValueError, match="backend='mmcv' needs a CUDA tensor"):
        deform_roi_pool(**args, backend='mmcv')


def test_module_checks_channels():
    with pytest.raises(ValueError, match='input has 3 channels but this module was built with '
                                         'output_channels=4'):
        DeformRoIPool(7, 4, deform_fc_channels=8)(torch.zeros(1, 3, 8, 8), torch.zeros(0, 5))
