"""Conformance: every path of the two ops passes the same cases, with the same values and the same errors.

Paths (``CONV_PATHS``, ``ROI_PATHS``; a new kernel joins by adding one entry):

- ``deform_conv2d``: dcn_det's compiled CPU kernel (``compiled``), the same in bfloat16 (``compiled-bf16``:
  what runs under CPU bfloat16 autocast; each case's tensors cast to bfloat16 and the results back, compared
  with the tolerance of bfloat16's rounding, or in relative norm against float64 on the same rounded inputs;
  no gradcheck), its public-API path (``public``, what runs where the compiled kernel is not built), mmcv's
  CPU kernels (``mmcv``), torchvision's (``torchvision``), and on a CUDA GPU the native op (public kernel),
  mmcv's and torchvision's CUDA kernels;
- ``deform_roi_pool``: the native kernel (``native``), the ``torchvision`` backend (bin RoIs through
  ``roi_align``: no offset gradient), and on CUDA the same two and mmcv's kernel (mmcv 2.1 has no CPU
  kernel for this op).

A path that should be here and is not (the compiled kernel not built, mmcv without its ops) fails; only the
CUDA paths skip without a GPU (``scripts/gpu_check.sh`` runs them, ``-m cuda``). A case that a third-party
kernel fails (its own convention or limit) is marked ``xfail(strict=True)`` with the reason
(``KNOWN_FAILURES``).

Cases, and where they come from:

- pytorch/vision, ``test/test_ops.py`` (``TestDeformConv``): a 3x2 kernel with stride (2, 1), padding (1, 0),
  dilation (2, 1), 2 weight groups and 3 offset groups, batch 0 and 33, every tensor contiguous or a
  permuted copy (same values, other strides), a mask from ``randn`` (negative values), with and without
  mask: the forward against a naive float64 loop (``tests/ops/_reference.py``) and fast ``gradcheck``;
  wrong offset and mask sizes refused, naming the argument; and the large map of pytorch/vision#2598
  (an 8x9x1000x110 input, here with 1 channel in and out), whose weight gradient must equal torchvision's
  CPU result.
- open-mmlab/mmcv, ``tests/test_ops/test_deform_conv.py``: the published DCNv1 output and gradients of a
  2x2 deformable conv whose offsets a 2x2 conv predicts, at batch 10, including the offset predictor's
  weight and bias gradients.
- open-mmlab/mmcv, ``tests/test_ops/test_modulated_deform_conv.py``: the published DCNv2 output and
  gradients of a freshly initialised modulated pack (zero offsets, mask 0.5, padding 1).
- open-mmlab/mmcv, ``tests/test_ops/test_deform_roi_pool.py``: the published outputs and input gradients
  of three freshly initialised ``DeformRoIPoolPack`` cases (zero offsets, 2x2 bins, sampling ratio 2).
- facebookresearch/detectron2, ``tests/layers/test_deformable.py``: the 5x5 golden table (``arange(25)``,
  offsets 0.5, a 3x3 ones kernel; the modulated one with mask 0.5 is half of it), and inputs smaller than
  the kernel.
- dcn_det (``tests/ops/_reference.py``): the shared conv configurations and the RoI case that exercises
  every edge rule, forward and gradients against the float64 loops (mmcv's kernel rules); memory formats
  (channels-last input and weight, strided offsets and masks: the same values, the output in the input's
  format, each gradient in its tensor's format); RoIs on none of the images; every argument rule, with the
  same error on every path.
"""
import collections
import contextlib
import dataclasses
import functools
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from dcn_det.ops import deform_conv, deform_conv2d, deform_roi_pool, use_cpu_kernel
from dcn_det.ops._common import memory_format, mmcv_has_cuda
from tests.ops._reference import CONFIGS, EDGES, conv_reference, make_inputs, random_case, roi_reference

# ------------------------------------------------------------------------------------------------
# paths


@dataclasses.dataclass(frozen=True)
class Path:
    """One way a call of ``op`` can run: the ``backend`` argument, the device and, for the native conv
    on the CPU, the kernel. ``rounding``: the least tolerance (relative and absolute) of every comparison
    on this path, for a path that rounds more than float64 arithmetic in one order does; ``offset_grad``:
    False where the path gives offsets no gradient by design."""

    name: str
    op: Callable[..., torch.Tensor]
    backend: str
    device: str = 'cpu'
    cpu_kernel: Optional[str] = None
    rounding: float = 0.0
    offset_grad: bool = True
    dtype: Optional[torch.dtype] = None  # a low-precision path: its floating-point tensors cast to this dtype

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.dtype is None:
            return self.op(*args, **kwargs, backend=self.backend)
        # computed in self.dtype, through casts, so that the output and the gradients have the callers' dtype;
        # arguments of mixed or non-floating dtypes (the dtype rule's cases) are passed as they are
        tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        if not tensors or len({t.dtype for t in tensors}) > 1 or not tensors[0].is_floating_point():
            return self.op(*args, **kwargs, backend=self.backend)
        source = tensors[0].dtype

        def cast(t: Any) -> Any:
            return t.to(self.dtype) if isinstance(t, torch.Tensor) else t

        out = self.op(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()}, backend=self.backend)
        return out.to(source)

    def put(self, value: Any) -> Any:
        """CPU tensors (alone or in a dict) moved to the path's device, strides kept; anything else as is."""
        if isinstance(value, dict):
            return {k: self.put(v) for k, v in value.items()}
        if isinstance(value, torch.Tensor) and value.device.type == 'cpu':
            return value.to(self.device)
        return value

    def close(self, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, msg: str = '') -> None:
        torch.testing.assert_close(actual.detach().cpu(), expected.detach().cpu(), rtol=max(rtol, self.rounding),
                                   atol=max(atol, self.rounding), msg=f'{self.name} {msg}'.strip())

    def skip_low_precision(self, why: str) -> None:
        if self.dtype is not None:
            pytest.skip(f'{self.name}: {why}')

    def missing(self) -> Optional[tuple[bool, str]]:
        """None if the path can run here, else (expected here, why it cannot)."""
        if self.device == 'cuda' and not torch.cuda.is_available():
            return False, 'needs a CUDA GPU'
        if self.backend == 'mmcv':
            try:
                from mmcv.ops import deform_conv2d as _  # noqa: F401  (loads mmcv's compiled ops)
            except ImportError as e:
                # a bare GPU machine (scripts/gpu_check.sh) need not have mmcv; the CPU set-up must
                return self.device == 'cpu', f'mmcv with its compiled ops does not import ({e})'
            if self.device == 'cuda' and not mmcv_has_cuda():
                return True, 'mmcv is installed without its CUDA kernels'
        if self.cpu_kernel is not None:
            try:
                with use_cpu_kernel(self.cpu_kernel):
                    deform_conv.cpu_kernel()
            except RuntimeError as e:
                return True, str(e)
        return None


CONV_PATHS = [
    Path('compiled', deform_conv2d, 'native', cpu_kernel='compiled'),
    Path('public', deform_conv2d, 'native', cpu_kernel='public'),
    # bfloat16 (columns and GEMMs in bfloat16, sums in float32) against the float64 figures: the tolerance is
    # bfloat16's rounding of the inputs and columns (3 significant digits)
    Path('compiled-bf16', deform_conv2d, 'native', cpu_kernel='compiled', dtype=torch.bfloat16, rounding=5e-2),
    Path('mmcv', deform_conv2d, 'mmcv'),
    Path('torchvision', deform_conv2d, 'torchvision'),
    # float64 atomics in the CUDA backward: another summation order
    Path('native-cuda', deform_conv2d, 'native', device='cuda', rounding=1e-8),
    Path('mmcv-cuda', deform_conv2d, 'mmcv', device='cuda', rounding=1e-8),
    Path('torchvision-cuda', deform_conv2d, 'torchvision', device='cuda', rounding=1e-8),
]
ROI_PATHS = [
    Path('native', deform_roi_pool, 'native'),
    # each bin RoI's corners are rounded once more (dcn_det.ops.deform_roi_pool)
    Path('torchvision', deform_roi_pool, 'torchvision', rounding=1e-10, offset_grad=False),
    Path('native-cuda', deform_roi_pool, 'native', device='cuda', rounding=1e-10),
    Path('mmcv-cuda', deform_roi_pool, 'mmcv', device='cuda', rounding=1e-10),
    Path('torchvision-cuda', deform_roi_pool, 'torchvision', device='cuda', rounding=1e-10, offset_grad=False),
]

# (case, path) -> why the path's own kernel fails the case; a case is a test's name without ``test_``,
# or that and one of its parameters' ids, ``name[id]``
TV_MINUS_ONE = ("torchvision's get_coordinate_weight has no h > -1 / w > -1 test: a sample exactly on row or "
                "column -1 (zero offsets, padding 1) gets a non-zero offset gradient where mmcv's has 0")
MMCV_SMALL = ("mmcv's DCNv1 kernel refuses an input smaller than the kernel, padding or not ('input image is "
              "smaller than kernel'; its DeformConv2dPack pads the input and crops the output around it)")
MMCV_ROI_GRAD = ("mmcv's offset gradient uses the unclamped coordinate in the border strips where the forward "
                 "clamps it (dcn_det.ops.deform_roi_pool)")
KNOWN_FAILURES = {
    ('mmcv_dcnv2_offset_predictor_gradients', 'torchvision'): TV_MINUS_ONE,
    ('mmcv_dcnv2_offset_predictor_gradients', 'torchvision-cuda'): TV_MINUS_ONE,
    ('detectron2_small_input[v1]', 'mmcv'): MMCV_SMALL,
    ('detectron2_small_input[v1]', 'mmcv-cuda'): MMCV_SMALL,
    ('roi_gradcheck', 'mmcv-cuda'): MMCV_ROI_GRAD,
}


def on_paths(all_paths: list[Path]):
    """Parametrize a test over ``all_paths`` (through the ``path`` fixture); the CUDA ones marked ``cuda``."""
    params = [pytest.param(p, id=p.name, marks=[pytest.mark.cuda] if p.device == 'cuda' else [])
              for p in all_paths]
    return pytest.mark.parametrize('path', params, indirect=True)


def _known_failure(node, p: Path) -> Optional[str]:
    case = node.originalname.removeprefix('test_')
    ids = node.callspec.id.split('-')
    for (known, name), reason in KNOWN_FAILURES.items():
        known_case, _, variant = known.partition('[')
        if name == p.name and known_case == case and (not variant or variant.rstrip(']') in ids):
            return reason
    return None


@pytest.fixture
def path(request):
    """The path of ``request.param``, after checking that it is here (fail, or skip a CUDA path without a
    GPU) and marking its known failure of this case ``xfail(strict=True)``; its CPU kernel chosen."""
    p = request.param
    missing = p.missing()
    if missing is not None:
        expected, why = missing
        (pytest.fail if expected else pytest.skip)(f'{p.name}: {why}')
    reason = _known_failure(request.node, p)
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    with contextlib.ExitStack() as stack:
        if p.cpu_kernel is not None:
            stack.enter_context(use_cpu_kernel(p.cpu_kernel))
        if p.dtype == torch.bfloat16:  # the bfloat16 kernel, whatever this CPU's bfloat16 instructions
            stack.enter_context(pytest.MonkeyPatch.context()).setenv('DCN_DET_CPU_BF16', '1')
        yield p


def relaid(t: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """The same values in other strides: ``t`` stored in the dimension order ``order``."""
    inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
    return t.permute(order).contiguous().permute(inverse)


def leaves(args: dict) -> dict:
    """Every tensor of ``args`` as a leaf that requires grad, with the same strides."""
    return {k: v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


# ------------------------------------------------------------------------------------------------
# deformable conv: torchvision's TestDeformConv case


TV_GEOMETRY = dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1))
# the permuted copies of pytorch/vision's test: every tensor stored in another dimension order
TV_ORDERS = {'input': (0, 1, 3, 2), 'offset': (1, 3, 0, 2), 'mask': (1, 3, 0, 2), 'weight': (3, 2, 0, 1)}


@functools.cache
def _tv_tensors(batch: int) -> dict:
    """6 input channels of 5x4, weight (2, 3, 3, 2) (2 groups), 3 offset groups; output 2x3."""
    g = torch.Generator().manual_seed(2598 + batch)
    kh, kw, offset_groups = 3, 2, 3
    return dict(input=torch.rand(batch, 6, 5, 4, generator=g, dtype=torch.float64),
                offset=torch.randn(batch, 2 * offset_groups * kh * kw, 2, 3, generator=g, dtype=torch.float64),
                mask=torch.randn(batch, offset_groups * kh * kw, 2, 3, generator=g, dtype=torch.float64),
                weight=torch.randn(2, 3, kh, kw, generator=g, dtype=torch.float64),
                bias=torch.randn(2, generator=g, dtype=torch.float64))


def _tv_args(path: Path, batch: int, contiguous: bool, modulated: bool) -> dict:
    tensors = dict(_tv_tensors(batch))
    if not contiguous:
        tensors = {k: relaid(t, TV_ORDERS[k]) if k in TV_ORDERS else t for k, t in tensors.items()}
        assert not any(tensors[k].is_contiguous() for k in TV_ORDERS if batch)
    if not modulated:
        tensors['mask'] = None
    return path.put(dict(tensors, **TV_GEOMETRY))


@functools.cache
def _tv_expected(batch: int, modulated: bool) -> torch.Tensor:
    t = _tv_tensors(batch)
    return conv_reference(t['input'], t['offset'], t['weight'], t['bias'], mask=t['mask'] if modulated else None,
                          **TV_GEOMETRY)


TV_VARIANTS = pytest.mark.parametrize('batch,contiguous', [(0, True), (0, False), (33, True), (33, False)])
MODULATED = pytest.mark.parametrize('modulated', [True, False], ids=['v2', 'v1'])


@on_paths(CONV_PATHS)
@TV_VARIANTS
@MODULATED
def test_torchvision_forward(path, batch, contiguous, modulated):
    args = leaves(_tv_args(path, batch, contiguous, modulated))
    out = path(**args)
    assert out.shape == (batch, 2, 2, 3) and out.dtype == torch.float64 and out.device.type == path.device
    path.close(out, _tv_expected(batch, modulated), rtol=1e-10, atol=1e-10)
    out.backward(torch.ones_like(out))
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            assert v.grad is not None and v.grad.shape == v.shape, k
    if batch == 0:  # nothing to differentiate: zero weight gradient, the bias's is the sum of nothing
        assert not args['weight'].grad.any() and not args['bias'].grad.any()


@on_paths(CONV_PATHS)
@TV_VARIANTS
@MODULATED
def test_torchvision_gradcheck(path, batch, contiguous, modulated):
    path.skip_low_precision('gradcheck: finite differences need float64')
    args = leaves(_tv_args(path, batch, contiguous, modulated))
    names = [k for k in ('input', 'offset', 'mask', 'weight', 'bias') if args[k] is not None]

    def fn(*tensors):
        return path(**dict(args, **dict(zip(names, tensors, strict=True))))

    assert gradcheck(fn, [args[k] for k in names], nondet_tol=1e-5, fast_mode=True)


@on_paths(CONV_PATHS)
@pytest.mark.parametrize('wrong', ['offset', 'mask'])
def test_torchvision_wrong_sizes(path, wrong):
    args = _tv_args(path, 10, True, True)
    args[wrong] = args[wrong][:, :2]
    with pytest.raises(ValueError, match=rf'^{wrong} must have .* channels .* got \(10, 2, 2, 3\)$'):
        path(**args)


# pytorch/vision#2598: CUDA weight gradients went wrong on large maps (the kernel's grid over output
# positions). What matters is the number of output positions, 8 x 1000 x 110; 9 channels in and out make
# the case 81 times dearer on the CPU and are reduced to 1. It runs on the CUDA kernels, where the bug
# lived, and on the default CPU kernel; on the public kernel (the code that runs on CUDA, tested there)
# it would cost 13 s on the CPU.
LARGE_MAP_PATHS = [p for p in CONV_PATHS if p.device == 'cuda' or (p.cpu_kernel == 'compiled' and p.dtype is None)]


@functools.cache
def _large_map(contiguous: bool) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(2598)
    args = dict(input=torch.randn(8, 1, 1000, 110, generator=g), offset=torch.rand(8, 18, 1000, 110, generator=g),
                mask=torch.rand(8, 9, 1000, 110, generator=g), weight=torch.randn(1, 1, 3, 3, generator=g))
    if not contiguous:
        args = {k: relaid(t, TV_ORDERS[k]) for k, t in args.items()}
    weight = args['weight'].detach().requires_grad_()
    deform_conv2d(**dict(args, weight=weight), padding=1, backend='torchvision').mean().backward()
    return args, weight.grad


@on_paths(LARGE_MAP_PATHS)
@pytest.mark.parametrize('contiguous', [True, False])
def test_large_map_weight_gradient(path, contiguous):
    args, expected = _large_map(contiguous)
    args = leaves(path.put(args))
    path(**args, padding=1).mean().backward()
    path.close(args['weight'].grad, expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# deformable conv: published golden numbers


# open-mmlab/mmcv tests/test_ops/test_deform_conv.py
MMCV_V1_INPUT = [[1., 2., 3.], [0., 1., 2.], [3., 5., 2.]]
MMCV_V1_OFFSET_WEIGHT = [[0.1, 0.4, 0.6, 0.1], [0.3, 0.2, 0.1, 0.3], [0.5, 0.5, 0.2, 0.8], [0.8, 0.3, 0.9, 0.1],
                         [0.3, 0.1, 0.2, 0.5], [0.3, 0.7, 0.5, 0.3], [0.6, 0.2, 0.5, 0.3], [0.4, 0.1, 0.8, 0.4]]
MMCV_V1_OFFSET_BIAS = [0.7, 0.1, 0.8, 0.5, 0.6, 0.5, 0.4, 0.7]
MMCV_V1_WEIGHT = [0.4, 0.2, 0.1, 0.9]
MMCV_V1_OUT = [[1.650, 0.], [0.000, 0.]]
MMCV_V1_INPUT_GRAD = [[-0.666, 0.204, 0.000], [0.030, -0.416, 0.012], [0.000, 0.252, 0.129]]
MMCV_V1_OFFSET_WEIGHT_GRAD = [[[1.44, 2.88], [0.00, 1.44]], [[-0.72, -1.44], [0.00, -0.72]],
                              [[0.00, 0.00], [0.00, 0.00]], [[0.00, 0.00], [0.00, 0.00]],
                              [[-0.10, -0.20], [0.00, -0.10]], [[-0.08, -0.16], [0.00, -0.08]],
                              [[-0.54, -1.08], [0.00, -0.54]], [[-0.54, -1.08], [0.00, -0.54]]]
MMCV_V1_OFFSET_BIAS_GRAD = [1.44, -0.72, 0., 0., -0.10, -0.08, -0.54, -0.54]
MMCV_V1_WEIGHT_GRAD = [[3.62, 0.], [0.40, 0.18]]

DTYPES = pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['f64', 'f32'])


@on_paths(CONV_PATHS)
@DTYPES
def test_mmcv_dcnv1(path, dtype):
    """mmcv's DeformConv2dPack (2x2 kernel, no padding, offsets from a 2x2 conv) at batch 10."""
    batch = 10

    def t(values, *shape):
        return path.put(torch.tensor(values, dtype=dtype).view(*shape)).requires_grad_()

    x = path.put(torch.tensor(MMCV_V1_INPUT, dtype=dtype).expand(batch, 1, 3, 3).contiguous()).requires_grad_()
    offset_weight, offset_bias = t(MMCV_V1_OFFSET_WEIGHT, 8, 1, 2, 2), t(MMCV_V1_OFFSET_BIAS, 8)
    weight = t(MMCV_V1_WEIGHT, 1, 1, 2, 2)
    out = path(x, F.conv2d(x, offset_weight, offset_bias), weight)
    out.backward(torch.ones_like(out))

    def close(actual, published, msg, per_sample=False):
        expected = torch.tensor(published, dtype=dtype)
        if per_sample:  # published for one sample
            expected = expected.expand(batch, *expected.shape)
        path.close(actual.view(expected.shape), expected, rtol=1e-3, atol=1e-3, msg=msg)

    close(out, MMCV_V1_OUT, 'output', per_sample=True)
    close(x.grad, MMCV_V1_INPUT_GRAD, 'input gradient', per_sample=True)
    # published per sample: the batch's parameter gradients are 10 times them
    close(offset_weight.grad / batch, MMCV_V1_OFFSET_WEIGHT_GRAD, 'offset predictor weight gradient')
    close(offset_bias.grad / batch, MMCV_V1_OFFSET_BIAS_GRAD, 'offset predictor bias gradient')
    close(weight.grad / batch, MMCV_V1_WEIGHT_GRAD, 'weight gradient')


# open-mmlab/mmcv tests/test_ops/test_modulated_deform_conv.py
MMCV_V2_INPUT = [[1., 2., 3.], [1., 2., 3.], [1., 2., 3.]]
MMCV_V2_OUT = [[0.5, 1.5, 2.5, 1.5], [1.0, 3.0, 5.0, 3.0], [1.0, 3.0, 5.0, 3.0], [0.5, 1.5, 2.5, 1.5]]
MMCV_V2_INPUT_GRAD = [[2., 2., 2.], [2., 2., 2.], [2., 2., 2.]]
MMCV_V2_WEIGHT_GRAD = [[9., 9.], [9., 9.]]
MMCV_V2_OFFSET_WEIGHT_GRAD = [[[-7.0, -4.0], [0.0, 0.0]], [[-9.0, 7.5], [-6.0, 5.0]], [[-4.0, -7.0], [0.0, 0.0]],
                              [[-7.5, -9.0], [-5.0, -6.0]], [[-7.0, -4.0], [-7.0, -4.0]], [[-6.0, 5.0], [-9.0, 7.5]],
                              [[-4.0, -7.0], [-4.0, -7.0]], [[-5.0, -6.0], [-7.5, -9.0]], [[10.5, 6.0], [7.0, 4.0]],
                              [[6.0, 10.5], [4.0, 7.0]], [[7.0, 4.0], [10.5, 6.0]], [[4.0, 7.0], [6.0, 10.5]]]
MMCV_V2_OFFSET_BIAS_GRAD = [-3.0, -1.5, -3.0, -1.5, -3.0, -1.5, -3.0, -1.5, 4.5, 4.5, 4.5, 4.5]


def _mmcv_dcnv2(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """mmcv's ModulatedDeformConv2dPack(1, 1, 2, padding=1, bias=False) with a ones weight, freshly
    initialised (its offset/mask conv is zero), under ``out.sum().backward()``: output and gradients."""
    x = path.put(torch.tensor(MMCV_V2_INPUT, dtype=dtype).view(1, 1, 3, 3)).requires_grad_()
    weight = path.put(torch.ones(1, 1, 2, 2, dtype=dtype)).requires_grad_()
    offset_weight = path.put(torch.zeros(12, 1, 2, 2, dtype=dtype)).requires_grad_()
    offset_bias = path.put(torch.zeros(12, dtype=dtype)).requires_grad_()
    o1, o2, m = F.conv2d(x, offset_weight, offset_bias, padding=1).chunk(3, 1)
    out = path(x, torch.cat([o1, o2], 1), weight, padding=1, mask=m.sigmoid())
    out.sum().backward()
    return dict(output=out[0, 0], input_grad=x.grad[0, 0], weight_grad=weight.grad[0, 0],
                offset_weight_grad=offset_weight.grad[:, 0], offset_bias_grad=offset_bias.grad)


@on_paths(CONV_PATHS)
@DTYPES
def test_mmcv_dcnv2(path, dtype):
    got = _mmcv_dcnv2(path, dtype)
    for key, published in (('output', MMCV_V2_OUT), ('input_grad', MMCV_V2_INPUT_GRAD),
                           ('weight_grad', MMCV_V2_WEIGHT_GRAD)):
        path.close(got[key], torch.tensor(published, dtype=dtype), rtol=1e-5, atol=1e-5, msg=key)


@on_paths(CONV_PATHS)
@DTYPES
def test_mmcv_dcnv2_offset_predictor_gradients(path, dtype):
    got = _mmcv_dcnv2(path, dtype)
    for key, published in (('offset_weight_grad', MMCV_V2_OFFSET_WEIGHT_GRAD),
                           ('offset_bias_grad', MMCV_V2_OFFSET_BIAS_GRAD)):
        path.close(got[key], torch.tensor(published, dtype=dtype), rtol=1e-5, atol=1e-5, msg=key)


# facebookresearch/detectron2 tests/layers/test_deformable.py
DETECTRON2_5X5 = [[30.00, 41.25, 48.75, 45.00, 28.75],
                  [62.25, 81.00, 90.00, 80.25, 50.25],
                  [99.75, 126.0, 135.0, 117.75, 72.75],
                  [105.0, 131.25, 138.75, 120.0, 73.75],
                  [71.75, 89.25, 93.75, 80.75, 49.50]]


@on_paths(CONV_PATHS)
@DTYPES
def test_detectron2_golden(path, dtype):
    x = path.put(torch.arange(25, dtype=dtype).view(1, 1, 5, 5))
    offset = path.put(torch.full((1, 18, 5, 5), 0.5, dtype=dtype))
    weight = path.put(torch.ones(1, 1, 3, 3, dtype=dtype))
    expected = torch.tensor(DETECTRON2_5X5, dtype=dtype)
    path.close(path(x, offset, weight, padding=1)[0, 0], expected, rtol=1e-6, atol=1e-5, msg='DCNv1')
    half = path(x, offset, weight, padding=1, mask=path.put(torch.full((1, 9, 5, 5), 0.5, dtype=dtype)))
    path.close(half[0, 0], expected / 2, rtol=1e-6, atol=1e-5, msg='DCNv2, mask 0.5')


@on_paths(CONV_PATHS)
@pytest.mark.parametrize('kernel_size', [3, 5])
@MODULATED
def test_detectron2_small_input(path, kernel_size, modulated):
    # an input smaller than the kernel, padded to keep its size
    args = make_inputs(n=1, c=1, h=kernel_size - 1, w=kernel_size - 1, c_out=1, kernel=(kernel_size, kernel_size),
                       padding=kernel_size // 2, modulated=modulated, scale=1.0)
    out = path(**path.put(args))
    assert out.shape == (1, 1, kernel_size - 1, kernel_size - 1)
    path.close(out, conv_reference(**args), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# deformable conv: the shared configurations, memory formats, argument rules


def _config_inputs(name: str, rounded_to: Optional[torch.dtype] = None) -> dict:
    """The inputs of CONFIGS[name] in float64, rounded to ``rounded_to``'s precision if given."""
    args = make_inputs(**CONFIGS[name])
    if rounded_to is None:
        return args
    return {k: v.to(rounded_to).double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@functools.cache
def _config_expected(name: str, rounded_to: Optional[torch.dtype] = None) -> tuple[torch.Tensor, dict]:
    args = leaves(_config_inputs(name, rounded_to))
    out = conv_reference(**args)
    tensors = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
    grads = torch.autograd.grad(out, list(tensors.values()), _grad_like(out))
    return out.detach(), dict(zip(tensors, grads, strict=True))


def _grad_like(out: torch.Tensor) -> torch.Tensor:
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)


# Relative error (Frobenius norm) a low-precision path may have against float64 on the same (rounded) inputs:
# a dense bfloat16 conv's for the output and the input, weight and bias gradients; the offset and mask
# gradients differences of the column gradient at neighbouring corners, more.
LOW_PRECISION_ERROR = dict(output=1e-2, input=1e-2, weight=1e-2, bias=1e-2, offset=3e-2, mask=3e-2)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().cpu().double() - expected).norm() / expected.norm().clamp_min(1e-30))


@on_paths(CONV_PATHS)
@pytest.mark.parametrize('name', CONFIGS)
def test_configs_forward_and_gradients(path, name):
    """Every tensor's gradient against the float64 loops; a low-precision path on the same inputs rounded to
    its dtype, within LOW_PRECISION_ERROR."""
    args = leaves(path.put(_config_inputs(name, path.dtype)))
    out = path(**args)
    out.backward(_grad_like(out))
    expected, grads = _config_expected(name, path.dtype)
    if path.dtype is None:
        path.close(out, expected, rtol=1e-10, atol=1e-10, msg='output')
        for k, g in grads.items():
            path.close(args[k].grad, g, rtol=1e-10, atol=1e-10, msg=f'{k} gradient')
        return
    errors = {'output': _relative_error(out, expected)}
    errors.update({k: _relative_error(args[k].grad, g) for k, g in grads.items()})
    assert all(e <= LOW_PRECISION_ERROR[k] for k, e in errors.items()), errors
    assert errors['output'] > 0, 'computed in float64, not in the path\'s dtype'


CHANNELS_LAST = torch.channels_last
LAYOUTS = {
    # every 4D tensor channels-last
    'channels_last': lambda a: {k: v.contiguous(memory_format=CHANNELS_LAST)
                                for k, v in a.items() if isinstance(v, torch.Tensor) and v.dim() == 4},
    # an NCHW input: the output stays NCHW whatever the weight's format
    'weight_channels_last': lambda a: dict(weight=a['weight'].contiguous(memory_format=CHANNELS_LAST)),
    # transposed storage, a mask with gaps between its elements, a channels-last input
    'strided': lambda a: dict(offset=a['offset'].transpose(2, 3).contiguous().transpose(2, 3),
                              weight=a['weight'].transpose(0, 1).contiguous().transpose(0, 1),
                              mask=torch.stack((a['mask'], a['mask']), -1)[..., 0],
                              input=a['input'].contiguous(memory_format=CHANNELS_LAST)),
}


@on_paths(CONV_PATHS)
@pytest.mark.parametrize('layout', LAYOUTS)
def test_memory_formats(path, layout):
    args = path.put(make_inputs(dtype=torch.float32))
    changed = LAYOUTS[layout](args)
    for k, v in changed.items():
        assert v.stride() != args[k].stride(), k
    relaid_args = dict(args, **changed)
    results = []
    for a in (args, relaid_args):
        a = leaves(a)
        tensors = {k: v for k, v in a.items() if isinstance(v, torch.Tensor)}
        out = path(**a)
        # a gradient in the output's own format, as the next layer would send it
        grads = torch.autograd.grad(out, list(tensors.values()),
                                    _grad_like(out).contiguous(memory_format=memory_format(out)))
        for (k, t), g in zip(tensors.items(), grads, strict=True):  # each gradient in its tensor's format
            assert g.stride() == t.contiguous(memory_format=memory_format(t)).stride(), k
        results.append((out, dict(zip(tensors, grads, strict=True))))
    (out, grads), (out_r, grads_r) = results
    assert out_r.is_contiguous(memory_format=memory_format(relaid_args['input']))
    assert out_r.is_contiguous(memory_format=CHANNELS_LAST) == (layout != 'weight_channels_last')
    torch.testing.assert_close(out_r, out)
    for k in grads:
        torch.testing.assert_close(grads_r[k], grads[k], msg=k)


def _good():
    return dict(make_inputs(n=2, c=4, h=8, w=8, c_out=4, dtype=torch.float32), padding=1)


CONV_BAD = {
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
                        'offset is on meta but input is on (cpu|cuda)'),
    'weight dtype': (dict(weight=torch.zeros(4, 4, 3, 3, dtype=torch.float64)), TypeError,
                     r'weight is torch.float64 but input is torch.float32: all tensors must have one dtype'),
    'mask dtype': (dict(mask=torch.zeros(2, 9, 8, 8, dtype=torch.float16)), TypeError, 'mask is torch.float16'),
}


@on_paths(CONV_PATHS)
@pytest.mark.parametrize('rule', CONV_BAD)
def test_conv_argument_rules(path, rule):
    change, error, match = CONV_BAD[rule]
    args = path.put(dict(_good(), **change))
    with pytest.raises(error, match=match):
        path(**args)


@on_paths(CONV_PATHS)
def test_conv_good_arguments(path):
    # the baseline that the rules modify is itself valid
    assert path(**path.put(_good())).shape == (2, 4, 8, 8)


# ------------------------------------------------------------------------------------------------
# deformable RoI pooling


# open-mmlab/mmcv tests/test_ops/test_deform_roi_pool.py: (input, rois, output, input gradient)
MMCV_ROI_CASES = [
    ([[[[1., 2.], [3., 4.]]]], [[0., 0., 0., 1., 1.]],
     [[[[1, 1.25], [1.5, 1.75]]]], [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2.], [3., 4.]], [[4., 3.], [2., 1.]]]], [[0., 0., 0., 1., 1.]],
     [[[[1., 1.25], [1.5, 1.75]], [[4, 3.75], [3.5, 3.25]]]],
     [[[[3.0625, 0.4375], [0.4375, 0.0625]], [[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2., 5., 6.], [3., 4., 7., 8.], [9., 10., 13., 14.], [11., 12., 15., 16.]]]], [[0., 0., 0., 3., 3.]],
     [[[[1.9375, 4.75], [7.5625, 10.375]]]],
     [[[[0.47265625, 0.4296875, 0.4296875, 0.04296875], [0.4296875, 0.390625, 0.390625, 0.0390625],
        [0.4296875, 0.390625, 0.390625, 0.0390625], [0.04296875, 0.0390625, 0.0390625, 0.00390625]]]]),
]


@on_paths(ROI_PATHS)
@pytest.mark.parametrize('case', range(len(MMCV_ROI_CASES)))
@DTYPES
def test_mmcv_roi_pool(path, case, dtype):
    """A fresh DeformRoIPoolPack((2, 2), C, spatial_scale=1, sampling_ratio=2): zero offsets."""
    input, rois, output, input_grad = (torch.tensor(v, dtype=dtype) for v in MMCV_ROI_CASES[case])
    x = path.put(input).requires_grad_()
    out = path(x, path.put(rois), path.put(torch.zeros(1, 2, 2, 2, dtype=dtype)), 2, 1.0, 2)
    out.backward(torch.ones_like(out))
    path.close(out, output, rtol=1e-6, atol=1e-6, msg='output')
    path.close(x.grad, input_grad, rtol=1e-6, atol=1e-6, msg='input gradient')


@functools.cache
def _roi_expected(sampling_ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    input, rois, offset = random_case(0)
    x = input.requires_grad_()
    stats = collections.Counter()
    expected = roi_reference(x, rois, offset, (3, 2), 0.25, sampling_ratio, 0.1, stats)
    assert min(stats[edge] for edge in EDGES) > 0, f'the case must exercise every edge rule: {stats}'
    return expected.detach(), torch.autograd.grad(expected, x, _grad_like(expected))[0]


@on_paths(ROI_PATHS)
@pytest.mark.parametrize('sampling_ratio', [0, 2])
def test_roi_reference(path, sampling_ratio):
    input, rois, offset = random_case(0)
    expected, expected_grad = _roi_expected(sampling_ratio)
    x_path = path.put(input).requires_grad_()
    out = path(x_path, path.put(rois), path.put(offset), (3, 2), 0.25, sampling_ratio, 0.1)
    assert out.shape == (7, 3, 3, 2) and out.dtype == torch.float64 and out.device.type == path.device
    path.close(out, expected, rtol=1e-12, atol=1e-12, msg='output')
    grad, = torch.autograd.grad(out, x_path, _grad_like(out))
    path.close(grad, expected_grad, rtol=1e-12, atol=1e-12, msg='input gradient')


@on_paths(ROI_PATHS)
def test_roi_gradcheck(path):
    input, rois, offset = random_case(2, n=2, c=1, h=5, w=6, k=3, output_size=(2, 3))
    rois[:, 0] = torch.tensor([0, 1, 1])
    input, rois, offset = path.put(input).requires_grad_(), path.put(rois), path.put(offset)
    for sampling_ratio in (0, 2):
        stats = collections.Counter()
        roi_reference(input.detach().cpu(), rois.cpu(), offset.detach().cpu(), (2, 3), 0.25, sampling_ratio, 0.1,
                      stats)
        assert min(stats[edge] for edge in EDGES) > 0, f'the case must exercise every edge rule: {stats}'
        # nondet_tol: the CUDA backwards add with atomics, in no fixed order
        if path.offset_grad:
            assert gradcheck(lambda x, o, sr=sampling_ratio: path(x, rois, o, (2, 3), 0.25, sr),
                             (input, offset.requires_grad_()), nondet_tol=1e-10)
        else:
            assert gradcheck(lambda x, sr=sampling_ratio: path(x, rois, offset, (2, 3), 0.25, sr), (input,),
                             nondet_tol=1e-10)


@on_paths(ROI_PATHS)
def test_roi_memory_formats(path):
    input, rois, offset = (path.put(t) for t in random_case(4, c=4, dtype=torch.float32))
    expected = path(input, rois, offset, (3, 2), 0.25)
    strided = path.put(torch.randn(3, 8, 9, 11))
    strided[:, ::2] = input
    for x in (input.contiguous(memory_format=CHANNELS_LAST), strided[:, ::2],
              input.transpose(2, 3).contiguous().transpose(2, 3)):
        x.requires_grad_(True)
        off = offset.transpose(2, 3).contiguous().transpose(2, 3)
        out = path(x, torch.cat([rois, rois], 1)[:, :5], off, (3, 2), 0.25)
        torch.testing.assert_close(out, expected)
        grad, = torch.autograd.grad(out, x, torch.ones_like(out))
        assert grad.stride() == x.contiguous(memory_format=memory_format(x)).stride()


@on_paths(ROI_PATHS)
def test_roi_no_rois(path):
    input = path.put(torch.randn(2, 3, 8, 8)).requires_grad_()
    offset = path.put(torch.zeros(0, 2, 7, 7)).requires_grad_(path.offset_grad)
    out = path(input, path.put(torch.zeros(0, 5)), offset, 7, 0.5)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert input.grad.shape == input.shape and not input.grad.any()
    if path.offset_grad:
        assert offset.grad.shape == (0, 2, 7, 7)


def _roi_call(path: Path, **overrides):
    args = dict(input=torch.zeros(2, 3, 8, 8), rois=torch.tensor([[0, 1., 1, 9, 9]]),
                offset=torch.zeros(1, 2, 7, 7), output_size=7)
    return path(**path.put(dict(args, **overrides)))


ROI_BAD = {
    'input not 4D': (dict(input=torch.zeros(3, 8, 8)), ValueError,
                     r'input must be a 4D tensor, got shape \(3, 8, 8\)'),
    'integer input': (dict(input=torch.zeros(2, 3, 8, 8, dtype=torch.long)), TypeError, 'input must be a floating'),
    'rois of 4 columns': (dict(rois=torch.zeros(1, 4)), ValueError, r'rois must have shape \[K, 5\] \(batch_index'),
    'rois not 2D': (dict(rois=torch.zeros(5)), ValueError, r'rois must be a 2D tensor'),
    'fractional batch index': (dict(rois=torch.tensor([[0.5, 1., 1, 9, 9]])), ValueError,
                               r'rois\[:, 0\] must be integer batch indices'),
    'half rois': (dict(rois=torch.tensor([[0, 1., 1, 9, 9]], dtype=torch.float16)), TypeError,
                  r'rois must be float32, float64 or the dtype of input'),
    'batch index too large': (dict(rois=torch.tensor([[2, 1., 1, 9, 9]])), ValueError,
                              r'rois\[:, 0\] must be integer batch indices in \[0, 1\]'),
    'negative batch index': (dict(rois=torch.tensor([[-1, 1., 1, 9, 9]])), ValueError,
                             r'rois\[:, 0\] must be integer batch indices'),
    'offset not 4D': (dict(offset=torch.zeros(1, 2, 7)), ValueError,
                      r'offset must be a 4D tensor, got shape \(1, 2, 7\)'),
    'offset bins': (dict(offset=torch.zeros(1, 2, 7, 6)), ValueError,
                    r'offset must have shape \[K, 2, ph, pw\] = \[1, 2, 7, 7\]'),
    'offset count': (dict(offset=torch.zeros(2, 2, 7, 7)), ValueError, r'offset must have shape \[K, 2, ph, pw\]'),
    'offset dtype': (dict(offset=torch.zeros(1, 2, 7, 7, dtype=torch.float64)), TypeError,
                     r'offset is torch.float64 but input is torch.float32: all tensors must have one dtype '
                     r'\(use offset.to'),
    'float output size': (dict(output_size=7.0), TypeError, r'output_size must be an int or a pair of ints, got 7\.0'),
    'output size triple': (dict(output_size=(7, 7, 7)), TypeError, 'output_size must be an int or a pair of ints'),
    'output size zero': (dict(output_size=0), ValueError, 'output_size must be >= 1'),
    'spatial scale string': (dict(spatial_scale='0.25'), ValueError, 'spatial_scale must be a number > 0'),
    'negative sampling ratio': (dict(sampling_ratio=-1), ValueError, r'sampling_ratio must be an int >= 0'),
    'spatial scale zero': (dict(spatial_scale=0.0), ValueError, 'spatial_scale must be a number > 0'),
    'empty map': (dict(input=torch.zeros(2, 3, 0, 8)), ValueError, 'input has an empty spatial size'),
    'device mismatch': (dict(rois=torch.zeros(1, 5, device='meta')), ValueError,
                        'rois is on meta but input is on (cpu|cuda)'),
}


@on_paths(ROI_PATHS)
@pytest.mark.parametrize('rule', ROI_BAD)
def test_roi_argument_rules(path, rule):
    change, error, match = ROI_BAD[rule]
    with pytest.raises(error, match=match):
        _roi_call(path, **change)


@on_paths(ROI_PATHS)
def test_roi_good_arguments(path):
    assert _roi_call(path).shape == (1, 3, 7, 7)
