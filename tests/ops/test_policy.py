"""What both ops share: the non-finite policy, the choice of CPU kernel, the torch.library custom op, the
torchvision RoI pooling backend, and an ops layer that needs torch and torchvision alone."""
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dcn_det.ops import (
    DeformRoIPool,
    ModulatedDeformRoIPool,
    NonFiniteError,
    _ext,
    cpu_kernel,
    deform_conv,
    deform_conv2d,
    deform_roi_pool,
    use_cpu_kernel,
)
from tests._helpers import REPO
from tests.ops._reference import make_inputs, random_case

CONV_BACKENDS = ['native-compiled', 'native-public', 'mmcv', 'torchvision']


def _conv(backend: str, **args):
    if backend.startswith('native'):
        with use_cpu_kernel(backend.split('-')[1]):
            return deform_conv2d(**args, backend='native')
    return deform_conv2d(**args, backend=backend)


# ------------------------------------------------------------------------------------------------
# non-finite offsets, masks and RoIs: one policy, every backend


@pytest.mark.parametrize('backend', CONV_BACKENDS)
@pytest.mark.parametrize('name,value', [('offset', float('nan')), ('offset', float('inf')), ('mask', float('nan'))])
def test_conv_refuses_non_finite_offsets_and_masks(backend, name, value):
    args = make_inputs(dtype=torch.float32)
    args[name][1, 3, 2, 1] = value
    with pytest.raises(NonFiniteError, match=rf'^{name} has 1 NaN/Inf value \(first at index \[1, 3, 2, 1\]\): '
                                             r'the training has probably diverged'):
        _conv(backend, **args)


@pytest.mark.parametrize('backend', CONV_BACKENDS)
def test_conv_propagates_non_finite_features(backend):
    # features are not checked: a NaN pixel makes NaN outputs, as a dense conv does
    args = make_inputs(dtype=torch.float32, scale=0.0)
    args['input'][0, :, 2, 2] = float('nan')
    out = _conv(backend, **args)
    assert out[0].isnan().any() and not out[1].isnan().any()


@pytest.mark.parametrize('backend', ['native', 'torchvision'])
@pytest.mark.parametrize('where', ['offset', 'roi x1', 'roi y2 inf', 'batch index'])
def test_roi_pool_refuses_non_finite_offsets_and_rois(backend, where):
    input, rois, offset = random_case(0, dtype=torch.float32)
    name, index, value = {'offset': ('offset', (2, 1, 0, 1), float('nan')),
                          'roi x1': ('rois', (4, 1), float('nan')),
                          'roi y2 inf': ('rois', (3, 4), float('inf')),
                          'batch index': ('rois', (5, 0), float('nan'))}[where]
    (offset if name == 'offset' else rois)[index] = value
    with pytest.raises(NonFiniteError, match=rf'^{name} has 1 NaN/Inf value \(first at index \[{index[0]}, '):
        deform_roi_pool(input, rois, offset, (3, 2), 0.25, backend=backend)


def test_layers_name_themselves_in_the_error():
    from dcn_det.models import DCNResNet

    backbone = DCNResNet(depth=18, base_channels=8)
    nn.init.constant_(backbone.layer3[1].conv2.conv_offset.bias, float('nan'))
    with pytest.raises(NonFiniteError, match=r'^backbone\.layer3\.1\.conv2: offset has \d+ NaN/Inf values'):
        backbone(torch.randn(1, 3, 64, 64))
    pool = ModulatedDeformRoIPool((3, 2), 3, deform_fc_channels=8, spatial_scale=0.25)
    nn.init.constant_(pool.offset_fc[-1].bias, float('inf'))
    input, rois, _ = random_case(1, dtype=torch.float32)
    with pytest.raises(NonFiniteError, match=r'^ModulatedDeformRoIPool: offset has 84 NaN/Inf values'):
        pool(input, rois)
    pool.layer_name = 'roi_head.bbox_roi_extractor.roi_layers.0'
    with pytest.raises(NonFiniteError, match=r'^roi_head\.bbox_roi_extractor\.roi_layers\.0: offset has'):
        pool(input, rois)


# ------------------------------------------------------------------------------------------------
# CPU kernels: compiled, or the public-API path with a notice


def test_compiled_kernel_is_built_and_chosen():
    # the package build (`make setup`: pip install -e .) compiles it; CI runs the suite on both kernels
    assert _ext.load() is not None, f'run `make setup` ({_ext.missing_reason()})'
    assert _ext.load().__name__ == 'dcn_det._C' and cpu_kernel() == 'compiled'


def test_without_compiled_kernel_falls_back_with_one_notice(monkeypatch):
    missing = "ModuleNotFoundError: No module named 'dcn_det._C'"  # as in a build without a compiler
    monkeypatch.setattr(_ext, '_state', {'module': None, 'reason': missing})
    monkeypatch.setattr(deform_conv, '_noticed', [False])
    monkeypatch.delenv('DCN_DET_CPU_KERNEL', raising=False)
    args = make_inputs(dtype=torch.float32)
    with pytest.warns(UserWarning, match=rf'no compiled CPU kernel \({re.escape(missing)}\); .* To build it: '
                                         rf'pip install --no-build-isolation \.'):
        out = deform_conv2d(**args, backend='native')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # once per process, not once per layer call
        deform_conv2d(**args, backend='native')
    with use_cpu_kernel('public'):
        torch.testing.assert_close(out, deform_conv2d(**args, backend='native'))
    monkeypatch.setenv('DCN_DET_CPU_KERNEL', 'compiled')
    with pytest.raises(RuntimeError, match=r'compiled CPU kernel does not load .* pip install --no-build-isolation'):
        deform_conv2d(**args, backend='native')


def test_kernel_choice_is_checked(monkeypatch):
    with pytest.raises(ValueError, match=r"kernel must be one of \('compiled', 'public'\), got 'fast'"):
        with use_cpu_kernel('fast'):
            pass
    monkeypatch.setenv('DCN_DET_CPU_KERNEL', 'avx')
    with pytest.raises(ValueError, match='DCN_DET_CPU_KERNEL must be one of'):
        cpu_kernel()


def test_compiled_and_public_kernels_agree_in_float32():
    args = make_inputs(n=2, c=32, h=9, w=11, c_out=16, offset_groups=2, dtype=torch.float32, scale=2.0)
    results = {}
    for kernel in deform_conv.CPU_KERNELS:
        with use_cpu_kernel(kernel):
            leaves = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
            out = deform_conv2d(**leaves, backend='native')
            grads = torch.autograd.grad(out, [leaves[k] for k in ('input', 'offset', 'mask', 'weight', 'bias')],
                                        torch.linspace(-1, 1, out.numel()).view_as(out))
            results[kernel] = (out, *grads)
    for a, b in zip(results['compiled'], results['public'], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# the custom op


def _op_args(modulated=True, bias=True, kernel_size=3):
    a = make_inputs(n=2, c=4, h=6, w=5, c_out=4, kernel=(kernel_size, kernel_size), offset_groups=2,
                    modulated=modulated, dtype=torch.float64, scale=1.5)
    return (a['input'], a['offset'], a['mask'], a['weight'], a['bias'] if bias else None, [1, 1], [1, 1], [1, 1],
            1, 2)


@pytest.mark.parametrize('kernel', deform_conv.CPU_KERNELS)
@pytest.mark.parametrize('modulated,bias', [(True, True), (False, False)])
def test_custom_op_passes_opcheck(kernel, modulated, bias):
    args = _op_args(modulated, bias)
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    with use_cpu_kernel(kernel):
        torch.library.opcheck(torch.ops.dcn_det.deform_conv2d.default, args)


class _TinyNet(nn.Module):

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.offset = nn.Conv2d(8, 27, 3, padding=1)
        nn.init.normal_(self.offset.weight, std=0.1)
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        o1, o2, m = self.offset(x).chunk(3, 1)
        out = deform_conv2d(x, torch.cat([o1, o2], 1), self.weight, padding=1, mask=m.sigmoid(), backend='native')
        return out.mean((2, 3))


def test_torch_compile_fullgraph_traces_the_op():
    torch.manual_seed(0)
    model = _TinyNet()
    x = torch.randn(2, 3, 10, 10)
    expected = model(x)
    expected.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)  # fullgraph: a graph break raises
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)


# ------------------------------------------------------------------------------------------------
# the torchvision backend of deform_roi_pool (what the ONNX export runs)


@pytest.mark.parametrize('sampling_ratio', [0, 2])
def test_torchvision_roi_pool_backend_in_the_modules(sampling_ratio):
    input, rois, _ = random_case(7, dtype=torch.float64)
    for cls in (DeformRoIPool, ModulatedDeformRoIPool):
        pool = cls((3, 2), 3, deform_fc_channels=8, spatial_scale=0.25, sampling_ratio=sampling_ratio).double()
        nn.init.normal_(pool.offset_fc[-1].weight, std=0.5)
        with torch.no_grad():
            native = pool(input, rois)
            pool.backend = 'torchvision'
            torch.testing.assert_close(pool(input, rois), native, rtol=1e-10, atol=1e-10)


def test_torchvision_roi_pool_backend_refuses_to_train():
    input, rois, offset = random_case(8, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend='torchvision' gives the offsets no gradient"):
        deform_roi_pool(input, rois, offset.requires_grad_(), (3, 2), 0.25, backend='torchvision')


# ------------------------------------------------------------------------------------------------
# dcn_det.ops needs torch and torchvision only


_NO_MM = """
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('mmcv', 'mmdet', 'mmengine'):
            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)', name=name)
sys.meta_path.insert(0, _Absent())
import torch
import dcn_det.ops as ops
x = torch.randn(1, 4, 6, 6)
out = ops.deform_conv2d(x, torch.zeros(1, 18, 6, 6), torch.randn(4, 4, 3, 3), padding=1, mask=torch.ones(1, 9, 6, 6))
pool = ops.ModulatedDeformRoIPool(3, 4, deform_fc_channels=8)(x, torch.tensor([[0., 0, 0, 4, 4]]))
assert not any(m.split('.')[0] in ('mmcv', 'mmdet', 'mmengine') for m in sys.modules), sorted(sys.modules)
print('ok', tuple(out.shape), tuple(pool.shape))
"""


def test_ops_import_and_run_without_the_mm_stack():
    result = subprocess.run([sys.executable, '-c', _NO_MM], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ['ok', '(1,', '4,', '6,', '6)', '(1,', '4,', '3,', '3)']


def test_no_private_torch_api_in_the_package():
    """Public APIs only: no private aten/mkldnn ops, torch._C, or ATen internals in C++ (they change without notice
    between torch releases, and the package installs against the user's torch)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2] / 'dcn_det'
    private = re.compile(r'torch\.ops\.(aten\._|mkldnn\.)|torch\._C\b|\bat::_|\bat::native::|torch\.ops\.aten\.\w+\._')
    files = [*root.rglob('*.py'), *root.rglob('*.cpp')]
    assert len(files) > 20
    hits = [f'{f.relative_to(root)}:{n}' for f in files
            for n, line in enumerate(f.read_text().splitlines(), 1) if private.search(line)]
    assert not hits, hits
