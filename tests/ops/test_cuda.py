"""The ops on a CUDA GPU: native (public kernels on CUDA), torchvision and, where installed, mmcv, in
float16/bfloat16 and under autocast, and CPU-CUDA agreement. The float64 cases every path passes alike
(CUDA ones included) are in tests/ops/test_conformance.py.

Needs torch and torchvision only (``scripts/gpu_check.sh`` runs it on a bare GPU machine); every test
is skipped without CUDA.
"""
import copy
import functools

import pytest
import torch

from dcn_det.ops import DeformRoIPool, ModulatedDeformRoIPool, deform_conv2d, deform_roi_pool
from dcn_det.ops._common import mmcv_has_cuda
from dcn_det.ops.deform_conv import resolve_backend
from tests.ops._reference import conv_reference, forward_backward, make_inputs, random_case

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

CONV_BACKENDS = ['native', 'torchvision'] + (['mmcv'] if mmcv_has_cuda() else [])


def _cuda(args: dict, dtype=None) -> dict:
    return {k: (v.to('cuda', dtype or v.dtype) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def _cpu(t):
    return t.detach().double().cpu()


@pytest.mark.parametrize('backend', CONV_BACKENDS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_conv_low_precision_against_reference(backend, dtype):
    args = make_inputs(n=2, c=16, h=12, w=10, c_out=8, scale=1.0)
    out_ref, g_ref = forward_backward(conv_reference, args)
    out, grads = forward_backward(functools.partial(deform_conv2d, backend=backend), _cuda(args, dtype))
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    scale = out_ref.abs().max()
    torch.testing.assert_close(_cpu(out) / scale, out_ref / scale, rtol=tol, atol=tol)
    for k in ('input', 'weight', 'mask'):
        s = g_ref[k].abs().max()
        torch.testing.assert_close(_cpu(grads[k]) / s, g_ref[k] / s, rtol=tol, atol=tol, msg=f'{backend} {k}')


@pytest.mark.parametrize('backend', CONV_BACKENDS)
def test_conv_under_autocast(backend):
    args = _cuda(make_inputs(n=2, c=8, h=10, w=10, c_out=8, scale=1.0), torch.float32)
    expected = deform_conv2d(**args, backend=backend)
    with torch.autocast('cuda', dtype=torch.float16):
        low = dict(args, offset=args['offset'].half(), mask=args['mask'].half())
        out = deform_conv2d(**low, backend=backend)
    assert out.dtype == torch.float32  # the op runs in float32 under autocast
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)


def test_auto_backend_on_cuda():
    assert resolve_backend('auto', torch.device('cuda')) == ('mmcv' if mmcv_has_cuda() else 'torchvision')


@pytest.mark.parametrize('sampling_ratio', [0, 2])
def test_roi_pool_gradients_match_cpu(sampling_ratio):
    input, rois, offset = random_case(3, n=2, c=16, h=32, w=40, k=64, output_size=(7, 7), dtype=torch.float64,
                                      offset_scale=0.5)
    rois[:, 0] = torch.arange(64) % 2
    results = {}
    for device in ('cpu', 'cuda'):
        x = input.to(device).requires_grad_(True)
        o = offset.to(device).requires_grad_(True)
        out = deform_roi_pool(x, rois.to(device), o, 7, 0.25, sampling_ratio, backend='native')
        grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).view_as(out)
        results[device] = [_cpu(t) for t in (out, *torch.autograd.grad(out, (x, o), grad))]
    for a, b in zip(results['cpu'], results['cuda'], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('cls', [DeformRoIPool, ModulatedDeformRoIPool])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_roi_pool_modules_low_precision_and_autocast(cls, dtype):
    input, rois, _ = random_case(4, c=8, dtype=torch.float32)
    pool = cls((3, 2), 8, deform_fc_channels=16, spatial_scale=0.25).cuda()
    torch.nn.init.normal_(pool.offset_fc[-1].weight, std=0.1)
    x, r = input.cuda(), rois.cuda()
    expected = pool(x, r)
    with torch.autocast('cuda', dtype=dtype):
        out = pool(x, r)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=5e-2, atol=5e-2)
    low_pool = copy.deepcopy(pool).to(dtype)
    low = low_pool(x.to(dtype), r)  # rois stay float32
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), expected, rtol=5e-2, atol=5e-2)
    low.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in low_pool.parameters() if p.grad is not None)
