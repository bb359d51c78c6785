"""Tests of dcn_det.ops.deform_conv2d (native on both CPU kernels / mmcv / torchvision) and the conv packs."""
import functools

import mmcv.ops
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.optim import build_optim_wrapper

from dcn_det.models import DeformConv2dPack, ModulatedDeformConv2dPack
from dcn_det.ops import BACKENDS, deform_conv2d, use_cpu_kernel
from dcn_det.ops import conv as dc
from dcn_det.ops.kernels import conv_native, conv_public, extension
from tests.ops._reference import TENSORS, forward_backward, make_inputs
from tests.ops._reference import conv_reference as reference

native = functools.partial(deform_conv2d, backend='native')


@pytest.fixture(params=conv_native.CPU_KERNELS)
def kernel(request):
    """Run the test on each CPU kernel of the native backend: the compiled one and the public-API one."""
    if request.param == 'compiled' and extension.load() is None:
        pytest.fail('the compiled CPU kernels are not built: run `make setup`')
    with use_cpu_kernel(request.param):
        yield request.param


CONFIGS = {
    'v2': dict(),
    'v1': dict(modulated=False),
    'groups2_offset_groups2': dict(c=4, c_out=4, groups=2, offset_groups=2),
    'offset_groups4_one_channel_each': dict(c=4, offset_groups=4),
    'stride2_dilation2_kernel3x2': dict(h=7, w=8, kernel=(3, 2), stride=2, padding=2, dilation=2),
    'tuple_args_no_padding': dict(h=6, w=7, stride=(1, 2), padding=(0, 1), dilation=(2, 1)),
    # TOOD's feature sampling: a depthwise 1x1 kernel with one offset group per channel, on a tiny map
    'depthwise_1x1_offset_group_per_channel': dict(c=4, c_out=4, h=1, w=2, kernel=(1, 1), groups=4, offset_groups=4,
                                                   padding=0, modulated=False),
}


@pytest.mark.parametrize('name', CONFIGS)
def test_native_matches_reference_forward_and_gradients(name, kernel):
    # offsets of scale 2.5 put many samples outside the image and across its borders
    args = make_inputs(**CONFIGS[name])
    out_ref, grads_ref = forward_backward(reference, args)
    out, grads = forward_backward(native, args)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    assert grads.keys() == grads_ref.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=1e-10, atol=1e-10, msg=k)


@pytest.mark.parametrize('backend', ['mmcv', 'torchvision'])
@pytest.mark.parametrize('name', CONFIGS)
def test_compiled_backends_match_reference_forward(name, backend):
    args = make_inputs(**CONFIGS[name])
    torch.testing.assert_close(deform_conv2d(**args, backend=backend), reference(**args))


def test_reference_is_not_trivially_zero():
    # guard against a vacuous reference: outside samples exist and the output depends on offsets
    args = make_inputs()
    moved = dict(args, offset=args['offset'] + 0.25)
    assert not torch.allclose(reference(**args), reference(**moved))


@pytest.fixture
def one_thread():
    # gradcheck makes ~2000 tiny calls; on a busy 2-core machine each multi-threaded call can stall
    # for milliseconds waiting for the second thread (seen: 18 s instead of 1 s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gradcheck_native_modulated(one_thread, kernel):
    args = make_inputs(n=2, c=2, h=4, w=4, c_out=2, scale=1.3, seed=3)
    tensors = [args[k].requires_grad_() for k in TENSORS]

    def fn(x, offset, mask, weight, bias):
        return native(input=x, offset=offset, weight=weight, bias=bias, padding=1, mask=mask)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6)


def test_gradcheck_native_groups_v1(one_thread, kernel):
    args = make_inputs(n=1, c=4, h=4, w=3, c_out=2, groups=2, offset_groups=2, stride=2,
                       modulated=False, scale=1.3, seed=4)

    def fn(x, offset, weight, bias):
        return native(input=x, offset=offset, weight=weight, bias=bias, stride=2, padding=1)

    tensors = [args[k].requires_grad_() for k in ('input', 'offset', 'weight', 'bias')]
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# golden cases


# detectron2's tests/layers/test_deformable.py: arange(25) 5x5 input, 3x3 ones weight, padding 1,
# every offset 0.5 (samples at half-pixels, reading zeros beyond the border)
GOLDEN = torch.tensor([[30.00, 41.25, 48.75, 45.00, 28.75],
                       [62.25, 81.00, 90.00, 80.25, 50.25],
                       [99.75, 126.0, 135.0, 117.75, 72.75],
                       [105.0, 131.25, 138.75, 120.0, 73.75],
                       [71.75, 89.25, 93.75, 80.75, 49.50]])


@pytest.mark.parametrize('backend', BACKENDS)
def test_golden_forward(backend, kernel):
    x = torch.arange(25.).view(1, 1, 5, 5)
    offset = torch.full((1, 18, 5, 5), 0.5)
    weight = torch.ones(1, 1, 3, 3)
    out = deform_conv2d(x, offset, weight, padding=1, backend=backend)
    torch.testing.assert_close(out[0, 0], GOLDEN)
    half = deform_conv2d(x, offset, weight, padding=1, mask=torch.full((1, 9, 5, 5), 0.5), backend=backend)
    torch.testing.assert_close(half[0, 0], GOLDEN / 2)


# Offset gradient of out.sum() at zero offsets, x = [[1, 2, 3], [4, 5, 6], [7, 8, 9]], 3x3 ones
# weight, padding 1. Kernel point k samples (y - 1 + k // 3, x - 1 + k % 3) for output (y, x); at an
# integer sample (h, w) mmcv's gradient is the right-sided difference x[h + 1, w] - x[h, w] (dy) and
# x[h, w + 1] - x[h, w] (dx), x reading 0 outside, and 0 when h or w is -1 or 3 (outside the open
# interval (-1, 3)).
GOLDEN_GRAD_MMCV = {
    'dy_k0': [[0, 0, 0], [0, 3, 3], [0, 3, 3]],      # samples (y-1, x-1): row -1 and column -1 give 0
    'dx_k0': [[0, 0, 0], [0, 1, 1], [0, 1, 1]],
    'dy_k8': [[3, 3, 0], [-8, -9, 0], [0, 0, 0]],    # samples (y+1, x+1): row 2 steps into the zero pad
    'dx_k8': [[1, -6, 0], [1, -9, 0], [0, 0, 0]],
}
# torchvision has no "h > -1" test in get_coordinate_weight: on row -1 / column -1 it differentiates
# towards row 0 / column 0 instead of giving 0.
GOLDEN_GRAD_TORCHVISION = dict(GOLDEN_GRAD_MMCV, dy_k0=[[0, 1, 2], [0, 3, 3], [0, 3, 3]],
                               dx_k0=[[0, 0, 0], [1, 1, 1], [4, 1, 1]])
CHANNEL = {'dy_k0': 0, 'dx_k0': 1, 'dy_k8': 16, 'dx_k8': 17}


def _golden_offset_grad(backend, mask):
    x = torch.arange(1., 10.).view(1, 1, 3, 3)
    offset = torch.zeros(1, 18, 3, 3, requires_grad=True)
    deform_conv2d(x, offset, torch.ones(1, 1, 3, 3), padding=1, mask=mask, backend=backend).sum().backward()
    return offset.grad[0]


@pytest.mark.parametrize('backend,expected', [('native', GOLDEN_GRAD_MMCV), ('mmcv', GOLDEN_GRAD_MMCV),
                                              ('torchvision', GOLDEN_GRAD_TORCHVISION)])
@pytest.mark.parametrize('modulated', [False, True])
def test_golden_offset_gradient_at_zero_offset(backend, expected, modulated, kernel):
    mask = torch.full((1, 9, 3, 3), 0.5) if modulated else None
    grad = _golden_offset_grad(backend, mask)
    scale = 0.5 if modulated else 1.0
    for key, channel in CHANNEL.items():
        torch.testing.assert_close(grad[channel], torch.tensor(expected[key]) * scale, msg=key)


def _edge_inputs(seed=0):
    # offsets in multiples of 0.5 in [-1.5, 1.5] put samples exactly on -1, H-1, H, integers and
    # half-pixels inside and outside the 4x5 image
    gen = torch.Generator().manual_seed(seed)
    args = make_inputs(n=2, c=3, h=4, w=5, c_out=2, seed=seed)
    args['offset'] = torch.randint(-3, 4, args['offset'].shape, generator=gen).double() * 0.5
    return args


@pytest.mark.parametrize('modulated', [False, True])
def test_edge_samples_native_and_mmcv_match_reference(modulated, kernel):
    args = _edge_inputs()
    if not modulated:
        args['mask'] = None
    out_ref, grads_ref = forward_backward(reference, args)
    for backend in ('native', 'mmcv'):
        out, grads = forward_backward(functools.partial(deform_conv2d, backend=backend), args)
        torch.testing.assert_close(out, out_ref, msg=backend)
        for k in grads:
            torch.testing.assert_close(grads[k], grads_ref[k], msg=f'{backend} {k}')


def test_edge_samples_torchvision_differs_only_on_minus_one():
    args = _edge_inputs()
    _, grads_ref = forward_backward(reference, args)
    _, grads_tv = forward_backward(functools.partial(deform_conv2d, backend='torchvision'), args)
    for k in ('input', 'mask', 'weight', 'bias'):
        torch.testing.assert_close(grads_tv[k], grads_ref[k], msg=k)
    # sample coordinates of every offset channel (dy channels hold h, dx channels w)
    n, _, h_out, w_out = args['offset'].shape
    k_idx = torch.arange(9)
    base_h = (torch.arange(h_out).view(1, -1, 1) - 1 + (k_idx // 3).view(-1, 1, 1)).double()
    base_w = (torch.arange(w_out).view(1, 1, -1) - 1 + (k_idx % 3).view(-1, 1, 1)).double()
    off = args['offset'].view(n, 9, 2, h_out, w_out)
    h, w = base_h + off[:, :, 0], base_w + off[:, :, 1]
    on_minus_one = ((h == -1) | (w == -1)).unsqueeze(2).expand(-1, -1, 2, -1, -1).reshape(n, 18, h_out, w_out)
    differs = ~torch.isclose(grads_tv['offset'], grads_ref['offset'])
    assert differs.any()
    assert not (differs & ~on_minus_one).any()


@pytest.mark.parametrize('modulated', [False, True])
def test_native_equals_mmcv_gradients_at_zero_offsets(modulated, kernel):
    # the initial state of every DCN layer: all samples on integer positions
    args = make_inputs(n=2, c=8, h=7, w=6, c_out=4, modulated=modulated, dtype=torch.float32)
    args['offset'] = torch.zeros_like(args['offset'])
    out_n, g_n = forward_backward(native, args)
    out_m, g_m = forward_backward(functools.partial(deform_conv2d, backend='mmcv'), args)
    torch.testing.assert_close(out_n, out_m, rtol=1e-5, atol=1e-5)
    for k in g_n:
        torch.testing.assert_close(g_n[k], g_m[k], rtol=1e-4, atol=1e-4, msg=k)
    _, g_tv = forward_backward(functools.partial(deform_conv2d, backend='torchvision'), args)
    assert not torch.allclose(g_n['offset'], g_tv['offset'], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# backends agree, layouts, batch 0, chunking, precision


@pytest.mark.parametrize('name', ['v2', 'v1', 'groups2_offset_groups2', 'stride2_dilation2_kernel3x2'])
def test_backends_agree_on_cpu(name, kernel):
    args = make_inputs(**dict(CONFIGS[name], n=3), dtype=torch.float32)  # batch 3: mmcv v1 im2col step
    out_n, g_n = forward_backward(native, args)
    out_m, g_m = forward_backward(functools.partial(deform_conv2d, backend='mmcv'), args)
    out_t = deform_conv2d(**args, backend='torchvision')
    torch.testing.assert_close(out_n, out_m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_n, out_t, rtol=1e-5, atol=1e-5)
    for k in g_n:
        torch.testing.assert_close(g_n[k], g_m[k], rtol=1e-4, atol=1e-4, msg=k)


@pytest.mark.parametrize('mmcv_cuda,expected', [(True, 'mmcv'), (False, 'torchvision')])
def test_auto_backend(monkeypatch, mmcv_cuda, expected):
    assert dc.resolve_backend('auto', torch.device('cpu')) == 'native'
    assert dc.resolve_backend('torchvision', torch.device('cpu')) == 'torchvision'
    monkeypatch.setattr(dc, 'mmcv_has_cuda', lambda: mmcv_cuda)
    assert dc.resolve_backend('auto', torch.device('cuda')) == expected


@pytest.mark.parametrize('backend', BACKENDS)
def test_batch_zero(backend, kernel):
    args = make_inputs(n=0, dtype=torch.float32)
    out, grads = forward_backward(functools.partial(deform_conv2d, backend=backend), args)
    assert out.shape == (0, 3, 6, 5)
    assert grads['input'].shape == (0, 4, 6, 5)
    assert torch.equal(grads['weight'], torch.zeros(3, 4, 3, 3))


def test_non_contiguous_and_channels_last_inputs(kernel):
    args = make_inputs(dtype=torch.float32)
    out, grads = forward_backward(native, args)
    # same values through transposed storage and a channels-last input
    strided = dict(args, offset=args['offset'].transpose(2, 3).contiguous().transpose(2, 3),
                   weight=args['weight'].transpose(0, 1).contiguous().transpose(0, 1),
                   mask=torch.stack((args['mask'], args['mask']), -1)[..., 0],
                   input=args['input'].contiguous(memory_format=torch.channels_last))
    assert not strided['offset'].is_contiguous() and not strided['mask'].is_contiguous()
    out_s, grads_s = forward_backward(native, strided)
    torch.testing.assert_close(out_s, out)
    assert out_s.is_contiguous(memory_format=torch.channels_last)
    for k in grads:
        torch.testing.assert_close(grads_s[k], grads[k], msg=k)


@pytest.mark.parametrize('wanted', [('offset',), ('input', 'mask'), ('weight',), ('bias',)])
def test_native_computes_only_the_gradients_asked_for(wanted, kernel):
    args = make_inputs()
    _, full = forward_backward(native, args)
    leaves = {k: (v.detach().requires_grad_(k in wanted) if isinstance(v, torch.Tensor) else v)
              for k, v in args.items()}
    grads = torch.autograd.grad(native(**leaves), [leaves[k] for k in wanted],
                                torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(1),
                                            dtype=torch.float64))
    for k, g in zip(wanted, grads, strict=True):
        torch.testing.assert_close(g, full[k], msg=k)


@pytest.mark.parametrize('rows_per_chunk', [1, 4])
def test_chunked_equals_unchunked(monkeypatch, rows_per_chunk, kernel):
    # 6 output rows per image: chunks of 4 rows straddle the two images, chunks of 1 split them
    args = make_inputs(n=2, c=4, h=6, w=5, offset_groups=2)
    out, grads = forward_backward(native, args)
    row_bytes = 5 * 9 * 4 * 8  # W_out * K * C * float64
    monkeypatch.setattr(conv_native, 'CHUNK_BYTES', rows_per_chunk * row_bytes)
    out_c, grads_c = forward_backward(native, args)
    torch.testing.assert_close(out_c, out, rtol=1e-12, atol=1e-12)
    for k in grads:
        torch.testing.assert_close(grads_c[k], grads[k], rtol=1e-12, atol=1e-12, msg=k)


def test_public_kernel_chunk_size_is_bounded(monkeypatch):
    calls = []
    real = conv_public._gather

    def spy(table, idx, psw):
        calls.append(idx.shape[0])
        return real(table, idx, psw)

    monkeypatch.setattr(conv_public, '_gather', spy)
    monkeypatch.setattr(conv_native, 'CHUNK_BYTES', 2 * 5 * 9 * 4 * 8)
    with use_cpu_kernel('public'):
        native(**make_inputs(n=2, c=4, h=6, w=5))
    assert calls == [2 * 5 * 9] * 6  # 12 output rows in chunks of 2 rows x 5 columns x 9 samples


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('backend', BACKENDS)
def test_low_precision_inputs(dtype, backend, kernel):
    args = make_inputs(dtype=torch.float32, scale=1.0)
    low = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    out, grads = forward_backward(functools.partial(deform_conv2d, backend=backend), low)
    assert out.dtype == dtype
    assert all(grads[k].dtype == dtype for k in grads)
    exact = deform_conv2d(**{k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in low.items()},
                          backend='native')
    torch.testing.assert_close(out.float(), exact, rtol=2e-2, atol=5e-2)


def test_autocast_bf16_cpu():
    torch.manual_seed(0)
    layer = ModulatedDeformConv2dPack(4, 6, 3, padding=1, backend='native')
    nn.init.normal_(layer.conv_offset.weight, std=0.1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float32  # the op returns its input's dtype
    out.sum().backward()
    assert layer.conv_offset.weight.grad.dtype == torch.float32
    grad = layer.conv_offset.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(out, layer(x), rtol=0.05, atol=0.05)


class _TinyNet(nn.Module):

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dcn = ModulatedDeformConv2dPack(8, 8, 3, padding=1, backend='native')
        nn.init.normal_(self.dcn.conv_offset.weight, std=0.1)

    def forward(self, x):
        return self.dcn(F.relu(self.stem(x))).mean((2, 3))


def test_torch_compile_aot_eager():
    torch.manual_seed(0)
    model = _TinyNet()
    x = torch.randn(2, 3, 10, 10)
    explanation = torch._dynamo.explain(model)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    torch._dynamo.reset()
    expected = model(x)
    expected.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend='aot_eager')
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)


# ------------------------------------------------------------------------------------------------
# pack modules


def test_modulated_pack_at_init_is_half_the_plain_conv():
    layer = ModulatedDeformConv2dPack(4, 6, 3, padding=1)
    assert layer.conv_offset.weight.abs().sum() == 0 and layer.conv_offset.bias.abs().sum() == 0
    x = torch.randn(2, 4, 9, 7)
    expected = 0.5 * F.conv2d(x, layer.weight, padding=1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected)


def test_deform_pack_at_init_is_the_plain_conv():
    layer = DeformConv2dPack(4, 6, 3, stride=2, padding=1)
    assert layer.conv_offset.weight.abs().sum() == 0 and layer.conv_offset.bias.abs().sum() == 0
    x = torch.randn(2, 4, 9, 7)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, stride=2, padding=1))


@pytest.mark.parametrize('ours,theirs', [(ModulatedDeformConv2dPack, mmcv.ops.ModulatedDeformConv2dPack),
                                         (DeformConv2dPack, mmcv.ops.DeformConv2dPack)])
def test_mmcv_state_dict_loads_strictly_and_gives_the_same_output(ours, theirs):
    torch.manual_seed(0)
    src = theirs(4, 6, 3, padding=1, deform_groups=2)
    nn.init.normal_(src.conv_offset.weight, std=0.2)
    dst = ours(4, 6, 3, padding=1, deform_groups=2, backend='native')
    assert isinstance(dst, theirs)
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(dst(x), src(x), rtol=1e-5, atol=1e-5)


def test_checkpoint_version_is_mmcvs():
    # checkpoints we write carry mmcv's _version (2), so mmcv's _load_from_state_dict treats them alike
    parent = nn.Module()
    parent.conv2 = ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    parent.conv3 = DeformConv2dPack(4, 4, 3, padding=1)
    metadata = parent.state_dict()._metadata
    assert metadata['conv2']['version'] == mmcv.ops.ModulatedDeformConv2dPack._version == 2
    assert metadata['conv3']['version'] == mmcv.ops.DeformConv2dPack._version == 2


def test_dcn_offset_lr_mult_reaches_conv_offset():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), ModulatedDeformConv2dPack(4, 4, 3, padding=1),
                          DeformConv2dPack(4, 4, 3, padding=1))
    wrapper = build_optim_wrapper(model, dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.02),
                                              paramwise_cfg=dict(dcn_offset_lr_mult=0.1)))
    lr = {id(p): group['lr'] for group in wrapper.optimizer.param_groups for p in group['params']}
    for name, p in model.named_parameters():
        assert lr[id(p)] == pytest.approx(0.002 if 'conv_offset' in name else 0.02), name


# ------------------------------------------------------------------------------------------------
# argument checks: one test per rule


def _good():
    return make_inputs(n=2, c=4, h=8, w=8, c_out=4, dtype=torch.float32)


BAD = {
    'input not a tensor': (dict(input=[[1.0]]), TypeError, 'input must be a Tensor'),
    'integer input': (dict(input=torch.zeros(2, 4, 8, 8, dtype=torch.long)), TypeError,
                      'input must be a floating-point tensor'),
    'input not 4D': (dict(input=torch.zeros(4, 8, 8)), ValueError, r'input must be a 4D tensor'),
    'offset channels': (dict(offset=torch.zeros(2, 17, 8, 8)), ValueError,
                        r'offset must have 2\*offset_groups\*kh\*kw = 18 channels .* \(H_out, W_out\) = '
                        r'\(8, 8\).* got \(2, 17, 8, 8\)'),
    'offset size': (dict(offset=torch.zeros(2, 18, 7, 8)), ValueError,
                    r'offset must have .* \(H_out, W_out\) = \(8, 8\).* got \(2, 18, 7, 8\)'),
    'offset batch': (dict(offset=torch.zeros(1, 18, 8, 8)), ValueError,
                     r'shape \(2, 18, 8, 8\), got \(1, 18'),
    'offset groups do not divide C_in': (dict(offset=torch.zeros(2, 54, 8, 8), mask=torch.zeros(2, 27, 8, 8)),
                                         ValueError, 'offset_groups = 3, which must divide C_in = 4'),
    'mask shape': (dict(mask=torch.zeros(2, 8, 8, 8)), ValueError,
                   r'mask must have offset_groups\*kh\*kw = 9 channels'),
    'weight channels': (dict(weight=torch.zeros(4, 3, 3, 3)), ValueError, 'groups dividing C_in = 4'),
    'out channels vs groups': (dict(weight=torch.zeros(3, 2, 3, 3), bias=torch.zeros(3)), ValueError,
                               'divisible by groups'),
    'bias size': (dict(bias=torch.zeros(5)), ValueError, 'bias must have C_out = 4 elements'),
    'input too small': (dict(input=torch.zeros(2, 4, 1, 1), padding=0), ValueError, 'too small'),
    'stride zero': (dict(stride=0), ValueError, 'stride must be >= 1'),
    'negative padding': (dict(padding=-1), ValueError, 'padding must be >= 0'),
    'dilation triple': (dict(dilation=(1, 1, 1)), TypeError, 'dilation must be an int or a pair of ints'),
    'float stride': (dict(stride=1.5), TypeError, r'stride must be an int or a pair of ints, got 1\.5'),
    'device mismatch': (dict(offset=torch.zeros(2, 18, 8, 8, device='meta')), ValueError,
                        'offset is on meta but input is on cpu'),
    'weight dtype': (dict(weight=torch.zeros(4, 4, 3, 3, dtype=torch.float64)), TypeError,
                     r'weight is torch.float64 but input is torch.float32: all tensors must have one dtype'),
    'mask dtype': (dict(mask=torch.zeros(2, 9, 8, 8, dtype=torch.float16)), TypeError, 'mask is torch.float16'),
    'unknown backend': (dict(backend='cuda'), ValueError,
                        r"backend must be one of \('auto', 'native', 'mmcv', 'torchvision'\), got 'cuda'"),
}


@pytest.mark.parametrize('case', BAD)
def test_bad_arguments_raise(case):
    change, error, match = BAD[case]
    args = dict(_good(), padding=1)
    args.update(change)
    with pytest.raises(error, match=match):
        deform_conv2d(**args)


def test_good_arguments_pass():
    # the baseline the BAD cases modify is itself valid
    assert deform_conv2d(**dict(_good(), padding=1)).shape == (2, 4, 8, 8)


def test_pack_rejects_unknown_backend():
    with pytest.raises(ValueError, match='backend must be one of'):
        ModulatedDeformConv2dPack(4, 4, 3, backend='fast')


def test_loading_a_checkpoint_logs_nothing_per_layer(monkeypatch):
    """mmcv's packs log 'is upgraded to version 2' for every layer of every current checkpoint."""
    import mmcv.ops.deform_conv as mmcv_dconv
    import mmcv.ops.modulated_deform_conv as mmcv_mdconv

    logged = []
    for module in (mmcv_dconv, mmcv_mdconv):
        monkeypatch.setattr(module, 'print_log', lambda msg, **kw: logged.append(msg))
    model = torch.nn.Sequential(ModulatedDeformConv2dPack(4, 4, 3, padding=1), DeformConv2dPack(4, 4, 3, padding=1))
    state = model.state_dict()
    assert state._metadata['0']['version'] == 2
    model.load_state_dict(state)
    assert logged == []
    reference = torch.nn.Sequential(mmcv_mdconv.ModulatedDeformConv2dPack(4, 4, 3, padding=1),
                                    mmcv_dconv.DeformConv2dPack(4, 4, 3, padding=1))
    reference.load_state_dict(state)
    assert len(logged) == 2, 'mmcv itself no longer logs: this override can go'
