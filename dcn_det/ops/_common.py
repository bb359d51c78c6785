"""What both deformable ops share: argument checks, the dtype rule, the non-finite policy, backends.

Dtype rule (both ops, every backend): every floating-point tensor argument must have ``input``'s
dtype, as ``F.conv2d`` requires, with two exceptions: RoI coordinates may be float32 or float64
whatever the features' dtype (image coordinates in float16 are only accurate to 0.5 px above 1024),
and under ``torch.autocast`` the arguments are cast to one dtype, :func:`autocast_dtype`: bfloat16 for
the deformable conv under CPU bfloat16 autocast on a CPU with native bfloat16 (the op then runs in
bfloat16, as autocast's ``conv2d`` does), float32 otherwise (the op runs in float32, as autocast's float32
ops do). Half and bfloat16 are computed in float32 and returned in ``input``'s dtype, except bfloat16
in the native deformable conv's compiled CPU kernel on such a CPU (:mod:`dcn_det.ops.deform_conv`).

Non-finite policy (both ops, every backend we call): a NaN or infinite offset, mask or RoI coordinate
raises :class:`NonFiniteError`, naming the tensor and how many values are bad; the layers add their
own name. Such a value would otherwise pick arbitrary pixels (or none) and hide a diverged training
run. Non-finite *features* are not checked: they propagate to the output, as in a dense conv.
"""
import functools
import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

IntPair = Union[int, tuple[int, int]]


class NonFiniteError(ValueError):
    """A NaN or infinite offset, mask or RoI coordinate reached a deformable op."""


def pair(value: IntPair, name: str, minimum: int) -> tuple[int, int]:
    """``value`` as a pair of ints, each at least ``minimum``; TypeError/ValueError naming ``name``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value_pair = (value, value)
    elif isinstance(value, (tuple, list)):
        value_pair = tuple(value)
    else:
        value_pair = ()
    if len(value_pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value_pair):
        raise TypeError(f'{name} must be an int or a pair of ints, got {value!r}')
    if min(value_pair) < minimum:
        raise ValueError(f'{name} must be >= {minimum}, got {value!r}')
    return value_pair  # type: ignore[return-value]


def check_tensor(t: Optional[Tensor], name: str, dim: int, optional: bool = False) -> None:
    """A floating-point tensor of ``dim`` dimensions (or None if ``optional``)."""
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f'{name} must be a Tensor, got {type(t).__name__}')
    if not t.is_floating_point():
        raise TypeError(f'{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}')
    if t.dim() != dim:
        raise ValueError(f'{name} must be a {dim}D tensor, got shape {tuple(t.shape)}')


def check_devices(input: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != input.device:
            raise ValueError(f'{name} is on {t.device} but input is on {input.device}: move it with '
                             f'.to(input.device)')


def check_dtypes(input: Tensor, **others: Optional[Tensor]) -> None:
    """The dtype rule (module docstring); call with the tensors that must match ``input``."""
    if torch.is_autocast_enabled(input.device.type):
        return
    for name, t in others.items():
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f'{name} is {t.dtype} but input is {input.dtype}: all tensors must have one dtype '
                            f'(use {name}.to(input.dtype), or run under torch.autocast)')


def check_finite(t: Optional[Tensor], name: str) -> None:
    """The non-finite policy (module docstring). A no-op while torch.compile traces."""
    if t is None or torch.compiler.is_compiling() or t.numel() == 0:
        return
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()[0].tolist()
    count = int((~finite).sum())
    raise NonFiniteError(f'{name} has {count} NaN/Inf value{"s" if count > 1 else ""} (first at index '
                         f'{bad}): the training has probably diverged; lower the learning rate, add gradient '
                         f'clipping (optim_wrapper.clip_grad), or check the input data')


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (half and bfloat16 are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def autocast_to_float32(*tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Under torch.autocast: every tensor as float32 (the op runs in float32); else unchanged."""
    return autocast_to(torch.float32, *tensors)


def autocast_to(dtype: torch.dtype, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Under torch.autocast: every tensor as ``dtype``; else unchanged."""
    if not any(t is not None and torch.is_autocast_enabled(t.device.type) for t in tensors):
        return tensors
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """The dtype the deformable conv runs in under autocast on ``device``: bfloat16 under CPU bfloat16
    autocast where the CPU computes bfloat16 natively (:func:`cpu_has_native_bf16`), else float32."""
    if (device.type == 'cpu' and torch.get_autocast_dtype('cpu') == torch.bfloat16
            and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


# CPU flags (Linux /proc/cpuinfo) of bfloat16 dot products: x86 AVX-512 BF16 or AMX, Arm's BF16 extension
NATIVE_BF16_FLAGS = ('avx512_bf16', 'amx_bf16', 'bf16')


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16, AMX-BF16 or Arm BF16), read
    from ``/proc/cpuinfo``; False where that cannot be read. oneDNN's bfloat16 GEMMs and convolutions
    outrun float32 only on such CPUs; elsewhere bfloat16 would be emulated, slower than float32.
    ``DCN_DET_CPU_BF16=0`` (or ``1``) overrides it, e.g. to compare the float32 path on such a CPU."""
    forced = os.environ.get('DCN_DET_CPU_BF16')
    if forced in ('0', '1'):
        return forced == '1'
    if forced is not None:
        raise ValueError(f'DCN_DET_CPU_BF16 must be 0 or 1, got {forced!r}')
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


@functools.cache
def cpu_flags() -> frozenset:
    """The CPU's feature flags from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); empty elsewhere."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() in ('flags', 'Features'):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def memory_format(t: Tensor) -> torch.memory_format:
    """The layout an op's output follows, as F.conv2d does: channels-last if ``t`` is (and not also NCHW)."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class _GradLayout(torch.autograd.Function):
    """Identity whose backward returns the gradient in a given memory format."""

    @staticmethod
    def forward(ctx, t: Tensor, fmt: torch.memory_format) -> Tensor:
        ctx.fmt = fmt
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.contiguous(memory_format=ctx.fmt), None


def grad_layout(t: Optional[Tensor], fmt: Optional[torch.memory_format] = None) -> Optional[Tensor]:
    """``t``, whose gradient comes back in ``fmt`` (default: ``t``'s own memory format, as the native
    kernels return it). For third-party kernels, which return NCHW gradients whatever came in, and
    for those that read the incoming gradient through a raw pointer (``fmt=torch.contiguous_format``)."""
    if t is None or not (t.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return t
    return _GradLayout.apply(t, memory_format(t) if fmt is None else fmt)


BACKENDS = ('native', 'mmcv', 'torchvision')
BACKEND_CHOICES = ('auto',) + BACKENDS  # both ops take these (see each op's module for what they mean)


def check_backend(backend: str, choices: Sequence[str]) -> str:
    """``backend`` if it is one of ``choices``, else ValueError listing them."""
    if backend not in choices:
        raise ValueError(f'backend must be one of {tuple(choices)}, got {backend!r}')
    return backend


@functools.cache
def mmcv_has_cuda() -> bool:
    """Whether mmcv is installed with its CUDA kernels (only asked for CUDA tensors)."""
    try:
        from mmcv.ops import get_compiling_cuda_version
    except ImportError:
        return False
    return get_compiling_cuda_version() != 'not available'
