"""dcn_det's deformable convolution as a ``torch.library`` custom op, and the choice of its CPU kernel.

``torch.ops.dcn_det.deform_conv2d(input, offset, mask, weight, bias, stride, padding, dilation,
groups, offset_groups)`` has a schema, a fake (meta) kernel, an autograd formula (through
``torch.ops.dcn_det.deform_conv2d_backward``), so ``torch.library.opcheck`` passes,
``torch.compile(fullgraph=True)`` traces a model holding it as one graph, and an ONNX exporter can be
given a translation for it (:mod:`dcn_det.deploy`). Tensors of any floating dtype go in; half and
bfloat16 are computed in float32 and the result has ``input``'s dtype and memory format.

Kernels: on the CPU the compiled extension (``compiled``, :mod:`.extension`) when it is built, else
:mod:`.conv_public` (``public``: public torch functions only) with a one-line notice; on other
devices ``public``. ``DCN_DET_CPU_KERNEL=compiled|public`` or :func:`use_cpu_kernel` forces one.
Both compute mmcv's semantics (see :mod:`dcn_det.ops.conv`) and check offsets and masks for NaN/Inf.
"""
import contextlib
import os
import warnings
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .._common import check_finite, compute_dtype, memory_format
from . import conv_public, extension

CPU_KERNELS = ('compiled', 'public')

# Upper bound on one column buffer (P_chunk x K*C); tests lower it to force chunking. Measured fastest
# among 4..64 MiB on CPU: larger buffers are mapped and page-faulted afresh on every call.
CHUNK_BYTES = 16 * 2**20


class Geometry(NamedTuple):
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    offset_groups: int
    out_size: tuple[int, int]


_forced: list[Optional[str]] = [None]
_noticed: list[bool] = [False]


def _requested_kernel() -> str:
    kernel = _forced[-1] or os.environ.get('DCN_DET_CPU_KERNEL') or 'auto'
    if kernel not in CPU_KERNELS + ('auto',):
        raise ValueError(f'DCN_DET_CPU_KERNEL must be one of {CPU_KERNELS + ("auto",)}, got {kernel!r}')
    return kernel


@contextlib.contextmanager
def use_cpu_kernel(kernel: str) -> Iterator[None]:
    """Run the CPU deformable conv on ``kernel`` ('compiled' or 'public') inside the block."""
    if kernel not in CPU_KERNELS:
        raise ValueError(f'kernel must be one of {CPU_KERNELS}, got {kernel!r}')
    _forced.append(kernel)
    try:
        yield
    finally:
        _forced.pop()


def cpu_kernel() -> str:
    """The kernel the CPU deformable conv runs now: 'compiled' or 'public'."""
    requested = _requested_kernel()
    if requested == 'public':
        return 'public'
    if extension.load() is not None:
        return 'compiled'
    if requested == 'compiled':
        raise RuntimeError(f'the compiled CPU kernel does not load ({extension.missing_reason()}): build it with '
                           f'{extension.HOW_TO_BUILD}, or use the public kernel')
    if not _noticed[0]:
        _noticed[0] = True
        warnings.warn(f'dcn_det: no compiled CPU kernel ({extension.missing_reason()}); deformable convs use the '
                      f'slower public-API path. To build it: {extension.HOW_TO_BUILD}', stacklevel=2)
    return 'public'


def native_deform_conv2d(input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor,
                         bias: Optional[Tensor], geom: Geometry) -> Tensor:
    """Call the custom op with checked arguments (:func:`dcn_det.ops.deform_conv2d` checks them)."""
    return torch.ops.dcn_det.deform_conv2d(input, offset, mask, weight, bias, list(geom.stride),
                                           list(geom.padding), list(geom.dilation), geom.groups,
                                           geom.offset_groups)


def _geometry(input: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int], groups: int, offset_groups: int) -> Geometry:
    kh, kw = weight.shape[2:]
    h_out = (input.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (input.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return Geometry(tuple(stride), tuple(padding), tuple(dilation), groups, offset_groups, (h_out, w_out))


def _use_compiled(t: Tensor) -> bool:
    return t.device.type == 'cpu' and cpu_kernel() == 'compiled'


@torch.library.custom_op('dcn_det::deform_conv2d', mutates_args=())
def deform_conv2d_op(input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor,
                     bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int], groups: int, offset_groups: int) -> Tensor:
    """input (Tensor[N, C, H, W]) -> Tensor[N, C_out, H_out, W_out]; see the module docstring."""
    check_finite(offset, 'offset')
    check_finite(mask, 'mask')
    geom = _geometry(input, weight, stride, padding, dilation, groups, offset_groups)
    dtype = compute_dtype(input, offset, mask, weight, bias)
    args = [None if t is None else t.to(dtype) for t in (input, offset, mask, weight, bias)]
    with torch.autocast(input.device.type, enabled=False):
        if _use_compiled(input):
            out = extension.load().deform_conv2d_forward(*args, *geom.stride, *geom.padding, *geom.dilation,
                                                         groups, offset_groups, CHUNK_BYTES)
        else:
            out = conv_public.forward(*args, geom, CHUNK_BYTES)
    return out.to(input.dtype).contiguous(memory_format=memory_format(input))


@deform_conv2d_op.register_fake
def _(input, offset, mask, weight, bias, stride, padding, dilation, groups, offset_groups):
    geom = _geometry(input, weight, stride, padding, dilation, groups, offset_groups)
    out = input.new_empty(input.shape[0], weight.shape[0], *geom.out_size)
    return out.contiguous(memory_format=memory_format(input))


@torch.library.custom_op('dcn_det::deform_conv2d_backward', mutates_args=())
def deform_conv2d_backward_op(grad_out: Tensor, input: Tensor, offset: Tensor, mask: Optional[Tensor],
                              weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                              padding: Sequence[int], dilation: Sequence[int], groups: int, offset_groups: int,
                              needs: Sequence[bool]) -> list[Tensor]:
    """Gradients of (input, offset, mask, weight, bias); an empty tensor where ``needs`` is False or
    the argument is None."""
    geom = _geometry(input, weight, stride, padding, dilation, groups, offset_groups)
    dtype = compute_dtype(input, offset, mask, weight, bias)
    args = [None if t is None else t.to(dtype) for t in (input, offset, mask, weight)]
    needs = [bool(v) for v in needs]
    needs[2] = needs[2] and mask is not None
    needs[4] = needs[4] and bias is not None
    with torch.autocast(input.device.type, enabled=False):
        if _use_compiled(input):
            grads = extension.load().deform_conv2d_backward(
                grad_out.to(dtype), *args, bias is not None, *geom.stride, *geom.padding, *geom.dilation, groups,
                offset_groups, CHUNK_BYTES, needs)
        else:
            grads = conv_public.backward(grad_out.to(dtype), *args, geom, needs, CHUNK_BYTES)
    like = (input, offset, mask, weight, bias)
    return [g.to(t.dtype).contiguous(memory_format=memory_format(t)) if need else input.new_empty(0)
            for g, t, need in zip(grads, like, needs, strict=True)]


@deform_conv2d_backward_op.register_fake
def _(grad_out, input, offset, mask, weight, bias, stride, padding, dilation, groups, offset_groups, needs):
    like = (input, offset, mask, weight, bias)
    return [torch.empty_like(t, memory_format=memory_format(t)) if need and t is not None else input.new_empty(0)
            for t, need in zip(like, needs, strict=True)]


def _setup_context(ctx, inputs, output) -> None:
    input, offset, mask, weight, bias, stride, padding, dilation, groups, offset_groups = inputs
    ctx.save_for_backward(input, offset, mask, weight, bias)
    ctx.params = (stride, padding, dilation, groups, offset_groups)


def _backward(ctx, grad_out: Tensor):
    input, offset, mask, weight, bias = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = torch.ops.dcn_det.deform_conv2d_backward(grad_out, input, offset, mask, weight, bias, *ctx.params,
                                                     needs)
    return (*[g if need else None for g, need in zip(grads, needs, strict=True)], None, None, None, None, None)


deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
