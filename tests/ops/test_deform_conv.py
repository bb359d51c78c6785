"""Tests of dcn_det.ops.deform_conv2d (native on both CPU kernels / mmcv / torchvision) and the conv packs.

What every path must pass alike (reference values and gradients, published golden numbers, memory formats,
argument rules) is in tests/ops/test_conformance.py; this module holds the rest: the edge convention of
each backend, kernel internals (chunking, needed gradients), precision, torch.compile and the packs."""
import functools

import mmcv.ops
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dcn_det.models import DeformConv2dPack, ModulatedDeformConv2dPack
from dcn_det.ops import BACKENDS, _ext, deform_conv, deform_conv2d, use_cpu_kernel
from dcn_det.ops import deform_conv as dc
from tests.ops._reference import CONFIGS, TENSORS, forward_backward, make_inputs
from tests.ops._reference import conv_reference as reference

native = functools.partial(deform_conv2d, backend='native')


@pytest.fixture(params=deform_conv.CPU_KERNELS)
def kernel(request):
    """Run the test on each CPU kernel of the native backend: the compiled one and the public-API one."""
    if request.param == 'compiled' and _ext.load() is None:
        pytest.fail(f'the compiled CPU kernel does not load ({_ext.missing_reason()}): run `make setup`')
    with use_cpu_kernel(request.param):
        yield request.param


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
    monkeypatch.setattr(deform_conv, 'CHUNK_BYTES', rows_per_chunk * row_bytes)
    out_c, grads_c = forward_backward(native, args)
    torch.testing.assert_close(out_c, out, rtol=1e-12, atol=1e-12)
    for k in grads:
        torch.testing.assert_close(grads_c[k], grads[k], rtol=1e-12, atol=1e-12, msg=k)


def test_public_kernel_chunk_size_is_bounded(monkeypatch):
    calls = []
    real = deform_conv._gather

    def spy(table, idx, psw):
        calls.append(idx.shape[0])
        return real(table, idx, psw)

    monkeypatch.setattr(deform_conv, '_gather', spy)
    monkeypatch.setattr(deform_conv, 'CHUNK_BYTES', 2 * 5 * 9 * 4 * 8)
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


@pytest.fixture(params=['1', '0'], ids=['native_bf16', 'no_native_bf16'])
def native_bf16(request, monkeypatch):
    """Run the test as on a CPU with native bfloat16 ('1': the bfloat16 kernel) and as on one without."""
    monkeypatch.setenv('DCN_DET_CPU_BF16', request.param)
    with use_cpu_kernel('compiled'):
        yield request.param == '1'


def test_autocast_bf16_cpu(native_bf16):
    """Under CPU bfloat16 autocast the op computes and returns bfloat16 where the CPU has native bfloat16 (as
    autocast's conv2d does), float32 elsewhere; the parameters' gradients are float32 either way."""
    torch.manual_seed(0)
    layer = ModulatedDeformConv2dPack(16, 8, 3, padding=1, backend='native')
    nn.init.normal_(layer.conv_offset.weight, std=0.1)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    out.float().sum().backward()
    for p in (layer.weight, layer.bias, layer.conv_offset.weight, x):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    exact = layer(x)
    assert ((out.float() - exact).norm() / exact.norm()) < 1e-2


def test_bf16_kernel_computes_in_bf16(monkeypatch):
    """bfloat16 tensors: the bfloat16 kernel where the CPU has native bfloat16, else float32 (closer to the
    float64 result); both return bfloat16."""
    args = make_inputs(n=2, c=32, h=9, w=9, c_out=16, dtype=torch.float64)
    low = {k: (v.bfloat16() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    exact = reference(**{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in low.items()})
    outs = {}
    with use_cpu_kernel('compiled'):
        for flag in ('1', '0'):
            monkeypatch.setenv('DCN_DET_CPU_BF16', flag)
            outs[flag] = native(**low)
            assert outs[flag].dtype == torch.bfloat16
    err = {flag: float((out.double() - exact).norm() / exact.norm()) for flag, out in outs.items()}
    assert 0 < err['1'] < 1e-2 and not torch.equal(outs['1'], outs['0'])


@pytest.mark.parametrize('name,chunk_rows', [('v2', None), ('v2', 3), ('groups2_offset_groups2', None)])
def test_bf16_at_network_sizes_against_float64(monkeypatch, name, chunk_rows):
    """A ResNet-like layer (64 channels, offsets of std 2 px): the bfloat16 kernel's output and gradients
    within a dense bfloat16 conv's relative error of float64 (1e-2), the offset and mask gradients 3e-2; in
    one chunk (the weight gradient is one GEMM) and in chunks of 3 output rows (summed in float32)."""
    monkeypatch.setenv('DCN_DET_CPU_BF16', '1')
    if chunk_rows:
        monkeypatch.setattr(deform_conv, 'CHUNK_BYTES', chunk_rows * 16 * 9 * 64 * 2)  # rows * W_out * K * C * 2 B
    config = dict(CONFIGS[name], n=2, c=64, c_out=64, h=16, w=16, scale=2.0)
    rounded = {k: (v.bfloat16().double() if isinstance(v, torch.Tensor) else v)
               for k, v in make_inputs(**config).items()}
    expected, expected_grads = forward_backward(reference, rounded)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    low = {k: (v.bfloat16().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in rounded.items()}
    with use_cpu_kernel('compiled'):
        out = native(**low)
    out.backward(grad_out.bfloat16())
    grads = {k: low[k].grad for k in expected_grads}
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads.values())

    def rel(a, b):
        return float((a.detach().double() - b).norm() / b.norm())

    assert rel(out, expected) < 1e-2
    for k, g in grads.items():
        assert rel(g, expected_grads[k]) < (3e-2 if k in ('offset', 'mask') else 1e-2), k
    # and a dense bfloat16 conv of the same inputs is about as far from float64
    groups = config['c'] // rounded['weight'].shape[1]
    dense = F.conv2d(rounded['input'].bfloat16(), rounded['weight'].bfloat16(), rounded['bias'].bfloat16(), padding=1,
                     groups=groups)
    dense_exact = F.conv2d(rounded['input'], rounded['weight'], rounded['bias'], padding=1, groups=groups)
    assert rel(out, expected) < 3 * rel(dense, dense_exact)


def test_float16_under_cpu_autocast_runs_in_float32():
    """CPU autocast in float16 (no native float16 kernels): the op computes in float32, as autocast's float32
    ops do, and returns float32."""
    args = make_inputs(n=1, c=4, h=6, w=6, dtype=torch.float32)
    with torch.autocast('cpu', dtype=torch.float16):
        out = native(**args)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, native(**args))


def test_bf16_input_with_float32_weight_is_refused():
    args = make_inputs(n=1, c=4, h=6, w=6, dtype=torch.float32)
    with pytest.raises(TypeError, match='weight is torch.float32 but input is torch.bfloat16'):
        native(**dict(args, input=args['input'].bfloat16(), offset=args['offset'].bfloat16(),
                      mask=args['mask'].bfloat16(), bias=args['bias'].bfloat16()))


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


# ------------------------------------------------------------------------------------------------
# argument checks: one test per rule


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'native', 'mmcv', 'torchvision'\), "
                                         r"got 'cuda'"):
        deform_conv2d(**make_inputs(dtype=torch.float32), backend='cuda')


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


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_output_can_be_modified_in_place(kernel, channels_last):
    """The op's output is a tensor of its own, not a view (RepPoints applies relu_ to it)."""
    args = make_inputs(n=2, c=4, h=6, w=5, dtype=torch.float32)
    if channels_last:
        args['input'] = args['input'].contiguous(memory_format=torch.channels_last)
    x = args['input'].requires_grad_()
    out = F.relu(native(**args), inplace=True)
    out.sum().backward()
    expected = F.relu(native(**dict(args, input=x.detach())))
    torch.testing.assert_close(out, expected)
    assert x.grad is not None and x.grad.abs().sum() > 0
