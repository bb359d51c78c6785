"""Deformable RoI pooling against a slow float64 reference with mmcv's kernel rules, a hand-checkable
golden case, torchvision's aligned RoIAlign, gradcheck, and (on CUDA) mmcv's compiled kernel."""
import collections
import importlib
import math

import pytest
import torch
from torch.autograd import gradcheck
from torchvision.ops import roi_align

from dcn_det.ops import DeformRoIPool, ModulatedDeformRoIPool, deform_roi_pool

drp = importlib.import_module('dcn_det.ops.deform_roi_pool')  # the package's deform_roi_pool is the function

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


# ----------------------------------------------------------------------------------------------
# slow reference: mmcv's deform_roi_pool_forward_cuda_kernel and bilinear_interpolate, as loops


def _bilinear(feat, y, x, stats):
    """mmcv's bilinear_interpolate at (y, x) of feat [C, H, W]; stats counts the edge cases hit: off
    the map, and in the strips [-1, 0] and [H - 1, H] (or W) where a coordinate is clamped."""
    h, w = feat.shape[1:]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        stats['outside'] += 1
        return feat.new_zeros(feat.shape[0])
    stats['low strip'] += y <= 0 or x <= 0
    stats['high strip'] += y >= h - 1 or x >= w - 1
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_high = y_low = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_high = x_low = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (hy * hx * feat[:, y_low, x_low] + hy * lx * feat[:, y_low, x_high]
            + ly * hx * feat[:, y_high, x_low] + ly * lx * feat[:, y_high, x_high])


EDGES = ('outside', 'low strip', 'high strip')


def reference(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, stats=None):
    stats = collections.Counter() if stats is None else stats
    ph, pw = output_size
    input = input.double()
    out = input.new_zeros(rois.shape[0], input.shape[1], ph, pw)
    for k, (b, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        x1, y1 = x1 * spatial_scale - 0.5, y1 * spatial_scale - 0.5
        x2, y2 = x2 * spatial_scale - 0.5, y2 * spatial_scale - 0.5
        rw, rh = x2 - x1, y2 - y1
        bw, bh = rw / pw, rh / ph
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw)
        count = max(gh * gw, 1)
        for i in range(ph):
            for j in range(pw):
                sx, sy = x1, y1
                if offset is not None:
                    sx += gamma * rw * float(offset[k, 0, i, j])
                    sy += gamma * rh * float(offset[k, 1, i, j])
                for iy in range(gh):
                    y = sy + i * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        x = sx + j * bw + (ix + 0.5) * bw / gw
                        out[k, :, i, j] += _bilinear(input[int(b)], y, x, stats)
                out[k, :, i, j] /= count
    return out


def torchvision_safe(rois):
    """Drop RoIs with x2 < x1: torchvision's CPU roi_align sizes a buffer by the (then negative)
    adaptive grid and fails with 'cannot create std::vector larger than max_size()'."""
    return rois[rois[:, 3] >= rois[:, 1]]


def random_case(seed, n=3, c=3, h=9, w=11, k=7, output_size=(3, 2), spatial_scale=0.25,
                dtype=torch.float64, offset_scale=3.0):
    """RoIs in image coordinates of a (4h x 4w) image, some partly outside it, one much larger than
    the map, one at the top-left corner, one with x2 < x1, none on image 1; offsets that push samples
    off the map."""
    g = torch.Generator().manual_seed(seed)
    img_h, img_w = h / spatial_scale, w / spatial_scale
    xy1 = torch.rand(k, 2, generator=g) * torch.tensor([img_w, img_h]) * 1.1 - 4
    wh = torch.rand(k, 2, generator=g) * torch.tensor([img_w, img_h]) * 0.7 + 2
    wh[0] = torch.tensor([img_w, img_h]) * 2.5
    xy1[1], wh[1] = -2.0, 6.0  # starts at -1 on the map: samples in the clamped strip [-1, 0]
    batch = torch.tensor([0, 2] * k)[:k, None].to(dtype)
    rois = torch.cat([batch, xy1, xy1 + wh], 1).to(dtype)
    rois[2, [1, 3]] = rois[2, [3, 1]]  # x2 < x1: no samples when adaptive, mirrored ones otherwise
    input = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    offset = ((torch.rand(k, 2, *output_size, generator=g, dtype=dtype) - 0.5) * 2 * offset_scale)
    return input, rois, offset


# ----------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize('sampling_ratio', [0, 2])
def test_matches_slow_reference(sampling_ratio):
    input, rois, offset = random_case(0)
    stats = collections.Counter()
    expected = reference(input, rois, offset, (3, 2), 0.25, sampling_ratio, 0.1, stats)
    out = deform_roi_pool(input, rois, offset, (3, 2), 0.25, sampling_ratio, 0.1)
    assert min(stats[edge] for edge in EDGES) > 0, f'the case must exercise every edge rule: {stats}'
    assert out.shape == (7, 3, 3, 2) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


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


def test_gradcheck():
    input, rois, offset = random_case(2, n=2, c=1, h=5, w=6, k=3, output_size=(2, 3))
    rois[:, 0] = torch.tensor([0, 1, 1])
    input.requires_grad_(True)
    offset.requires_grad_(True)
    for sampling_ratio in (0, 2):
        stats = collections.Counter()
        reference(input.detach(), rois, offset.detach(), (2, 3), 0.25, sampling_ratio, 0.1, stats)
        assert min(stats[edge] for edge in EDGES) > 0, f'the case must exercise every edge rule: {stats}'
        assert gradcheck(lambda x, o, sr=sampling_ratio: deform_roi_pool(x, rois, o, (2, 3), 0.25, sr),
                         (input, offset))


def test_empty_rois():
    input = torch.randn(2, 3, 8, 8, requires_grad=True)
    offset = torch.zeros(0, 2, 7, 7, requires_grad=True)
    out = deform_roi_pool(input, torch.zeros(0, 5), offset, 7, 0.5)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert input.grad.shape == input.shape and not input.grad.any()
    assert offset.grad.shape == (0, 2, 7, 7)
    pool = ModulatedDeformRoIPool(7, 3, deform_fc_channels=8, spatial_scale=0.5)
    assert pool(input, torch.zeros(0, 5)).shape == (0, 3, 7, 7)


def test_image_without_rois():
    input, rois, offset = random_case(3, dtype=torch.float32)  # RoIs on images 0 and 2 only
    input.requires_grad_(True)
    out = deform_roi_pool(input, rois, offset, (3, 2), 0.25)
    out.backward(torch.randn_like(out))
    assert not input.grad[1].any() and input.grad[0].any() and input.grad[2].any()
    pair = input.detach()[[0, 2]]
    remapped = torch.cat([rois[:, :1] / 2, rois[:, 1:]], 1)
    torch.testing.assert_close(out, deform_roi_pool(pair, remapped, offset, (3, 2), 0.25))


def test_non_contiguous_inputs():
    input, rois, offset = random_case(4, c=4, dtype=torch.float32)
    expected = deform_roi_pool(input, rois, offset, (3, 2), 0.25)
    strided = torch.randn(3, 8, 9, 11)
    strided[:, ::2] = input
    for x in (input.to(memory_format=torch.channels_last), strided[:, ::2],
              input.transpose(2, 3).contiguous().transpose(2, 3)):
        x.requires_grad_(True)
        off = offset.transpose(2, 3).contiguous().transpose(2, 3)
        out = deform_roi_pool(x, torch.cat([rois, rois], 1)[:, :5], off, (3, 2), 0.25)
        torch.testing.assert_close(out, expected)
        grad, = torch.autograd.grad(out, x, torch.ones_like(out))
        assert grad.stride() == x.contiguous(memory_format=drp._memory_format(x)).stride()


def test_chunked_equals_unchunked(monkeypatch):
    input, rois, offset = random_case(5, k=12, dtype=torch.float64)
    input.requires_grad_(True)
    offset.requires_grad_(True)
    results = []
    for entries in (drp._CHUNK_ENTRIES, 40):  # 40 entries: chunks of one or two RoIs
        monkeypatch.setattr(drp, '_CHUNK_ENTRIES', entries)
        out = deform_roi_pool(input, rois, offset, (3, 2), 0.25)
        grads = torch.autograd.grad(out, (input, offset), torch.arange(out.numel()).view_as(out).double())
        results.append((out, *grads))
    assert len(drp._plan(rois, offset.detach(), drp._Params(3, 2, 0.25, 0, 0.1), 3, 9, 11)) >= 7
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
    a = ModulatedDeformRoIPool(7, 8, deform_fc_channels=16, spatial_scale=0.25)
    b = ModulatedDeformRoIPool(7, 8, deform_fc_channels=16, spatial_scale=0.125)
    b.offset_fc, b.mask_fc = a.offset_fc, a.mask_fc
    with torch.no_grad():
        a.offset_fc[-1].bias.fill_(0.3)
    assert b.offset_fc[-1].bias.eq(0.3).all()
    parent = torch.nn.ModuleList([a, b])
    assert sum(p.numel() for p in parent.parameters()) == sum(p.numel() for p in a.parameters())


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


def _call(**overrides):
    args = dict(input=torch.zeros(2, 3, 8, 8), rois=torch.tensor([[0, 1., 1, 9, 9]]),
                offset=torch.zeros(1, 2, 7, 7), output_size=7)
    args.update(overrides)
    return deform_roi_pool(**args)


@pytest.mark.parametrize('overrides, error, match', [
    (dict(input=torch.zeros(3, 8, 8)), ValueError, r'input must be a 4D tensor \[N, C, H, W\]'),
    (dict(input=torch.zeros(2, 3, 8, 8, dtype=torch.long)), TypeError, 'input must be a floating'),
    (dict(rois=torch.zeros(1, 4)), ValueError, r'rois must have shape \[K, 5\] \(batch_index'),
    (dict(rois=torch.zeros(5)), ValueError, r'rois must have shape \[K, 5\]'),
    (dict(rois=torch.tensor([[2, 1., 1, 9, 9]])), ValueError,
     r'rois\[:, 0\] must be batch indices in \[0, 1\]'),
    (dict(rois=torch.tensor([[-1, 1., 1, 9, 9]])), ValueError, r'rois\[:, 0\] must be batch indices'),
    (dict(offset=torch.zeros(1, 2, 7)), ValueError,
     r'offset must have shape \[K, 2, ph, pw\] = \[1, 2, 7, 7\]'),
    (dict(offset=torch.zeros(2, 2, 7, 7)), ValueError, r'offset must have shape \[K, 2, ph, pw\]'),
    (dict(offset=torch.zeros(1, 2, 7, 7, dtype=torch.float64)), TypeError,
     'offset must have the dtype of input'),
    (dict(output_size=(7, 7, 7)), TypeError, 'output_size must be an int or a pair of ints'),
    (dict(output_size=0), ValueError, 'output_size must be positive'),
    (dict(sampling_ratio=-1), ValueError, r'sampling_ratio must be an int >= 0'),
    (dict(spatial_scale=0.0), ValueError, 'spatial_scale must be > 0'),
    (dict(input=torch.zeros(2, 3, 0, 8)), ValueError, 'input has an empty spatial size'),
    (dict(backend='cuda'), ValueError, r"backend must be one of \('auto', 'native', 'mmcv'\)"),
    (dict(backend='mmcv'), ValueError, "backend='mmcv' needs a CUDA tensor"),
])
def test_bad_arguments(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_module_checks_channels():
    with pytest.raises(ValueError, match='input has 3 channels but this module was built with '
                                         'output_channels=4'):
        DeformRoIPool(7, 4, deform_fc_channels=8)(torch.zeros(1, 3, 8, 8), torch.zeros(0, 5))


# ----------------------------------------------------------------------------------------------
# CUDA: native against mmcv's compiled kernel


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize('sampling_ratio', [0, 2])
def test_cuda_native_matches_mmcv(sampling_ratio):
    assert drp._mmcv_has_cuda(), 'mmcv must be compiled with CUDA on a CUDA machine'
    # offsets small enough that every sample stays inside [0, H - 1] x [0, W - 1], where mmcv's
    # offset gradient is the derivative of its forward (see the module docstring)
    input, rois, offset = random_case(9, n=2, c=16, h=32, w=40, k=64, output_size=(7, 7),
                                      dtype=torch.float32, offset_scale=0.2)
    rois[:, 1:] = torch.cat([rois[:, 1:3].clamp(16, 100), rois[:, 1:3].clamp(16, 100) + 24], 1)
    rois[:, 0] = torch.arange(64) % 2
    results = {}
    for backend in ('native', 'mmcv'):
        x = input.cuda().requires_grad_(True)
        o = offset.cuda().requires_grad_(True)
        out = deform_roi_pool(x, rois.cuda(), o, 7, 0.25, sampling_ratio, backend=backend)
        grad = torch.linspace(-1, 1, out.numel(), device='cuda').view_as(out)
        results[backend] = (out, *torch.autograd.grad(out, (x, o), grad))
    for a, b in zip(results['native'], results['mmcv'], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@cuda
def test_cuda_native_matches_mmcv_forward_and_input_grad_at_borders():
    input, rois, offset = random_case(10, c=8, dtype=torch.float32)
    results = {}
    for backend in ('native', 'mmcv'):
        x = input.cuda().requires_grad_(True)
        out = deform_roi_pool(x, rois.cuda(), offset.cuda(), (3, 2), 0.25, backend=backend)
        results[backend] = (out, torch.autograd.grad(out.sum(), x)[0])  # sum: expanded grad_output
    for a, b in zip(results['native'], results['mmcv'], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@cuda
def test_cuda_modules_and_auto_backend():
    input, rois, _ = random_case(11, c=4, dtype=torch.float32)
    rois = torchvision_safe(rois)
    expected = roi_align(input, rois, (3, 2), 0.25, 0, aligned=True).cuda()
    pool = ModulatedDeformRoIPool((3, 2), 4, deform_fc_channels=16, spatial_scale=0.25).cuda()
    torch.testing.assert_close(pool(input.cuda(), rois.cuda()), 0.5 * expected)
    assert drp._resolve_backend('auto', torch.device('cuda')) == 'mmcv'
