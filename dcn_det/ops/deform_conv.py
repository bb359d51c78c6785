"""``deform_conv2d``: deformable convolution, DCNv1 and DCNv2 (modulated), behind one functional.

A drop-in for :func:`torchvision.ops.deform_conv2d` (same arguments, offset layout and inference of
``groups``/``offset_groups`` from the shapes) with a ``backend`` switch:

- ``'native'``: dcn_det's own op, ``torch.ops.dcn_det.deform_conv2d`` (a ``torch.library`` custom
  op: ``torch.compile`` traces it whole, it has an ONNX translation). On the CPU it runs the compiled
  kernel, or, where that is not built, a path on public torch functions; on other devices the public
  path. Float64 too (gradcheck).
- ``'mmcv'``: mmcv's compiled kernels (``modulated_deform_conv2d``; ``deform_conv2d`` for DCNv1).
- ``'torchvision'``: :func:`torchvision.ops.deform_conv2d` (the ONNX exporter turns it into the
  standard ``DeformConv`` op).
- ``'auto'``: native on CPU; on CUDA mmcv when mmcv was compiled with CUDA, else torchvision.

Every backend takes tensors of any strides and memory format, checked here before dispatch (one set of
errors for all), and returns the output in ``input``'s memory format and each gradient in its tensor's;
``tests/ops/test_conformance.py`` runs all of them through the same cases.

Edge convention: native reproduces mmcv's kernels (``dmcn_im2col_bilinear``,
``dmcn_get_coordinate_weight``) forward and backward, including their one-sided derivative at
integer sample positions. A sample at (h, w) counts only when ``-1 < h < H`` and ``-1 < w < W``
(else it is 0 with zero gradient); it reads the corners ``floor(h), floor(h) + 1`` (likewise w), a
corner outside the image reading 0; the offset gradient is the derivative of that interpolant with
the corners held fixed, i.e. the right-sided derivative at integer positions. torchvision differs
in one place: its ``get_coordinate_weight`` has no ``h > -1`` / ``w > -1`` test, so a sample lying
exactly on -1 (with zero offsets and padding 1: the whole top padding row and left padding column)
gets the derivative towards row/column 0 there, where mmcv and native give 0. Forward values and the
input, weight, bias and mask gradients agree between all three.

Dtypes, autocast and non-finite offsets or masks: :mod:`dcn_det.ops._common`. The backward is
once-differentiable (no double backward, as in mmcv).

The op: ``torch.ops.dcn_det.deform_conv2d(input, offset, mask, weight, bias, stride, padding, dilation,
groups, offset_groups)`` has a schema, a fake (meta) kernel, an autograd formula (through
``torch.ops.dcn_det.deform_conv2d_backward``), so ``torch.library.opcheck`` passes,
``torch.compile(fullgraph=True)`` traces a model holding it as one graph, and an ONNX exporter can be
given a translation for it (:mod:`dcn_det.deploy`). Its kernels: on the CPU the compiled one
(``compiled``: ``csrc/deform_conv_cpu.cpp``, built with the package as ``dcn_det._C``) when it loads, else
the public-API kernel at the end of this file (``public``) with a one-line notice; on other devices
``public``. ``DCN_DET_CPU_KERNEL=compiled|public`` or :func:`use_cpu_kernel` forces one. Half is
computed in float32; bfloat16 in bfloat16 by the compiled kernel on a CPU with native bfloat16 (GEMMs in
bfloat16, sums in float32: :mod:`dcn_det.ops._common`), in float32 elsewhere; the result has ``input``'s
dtype and memory format.

"""
import contextlib
import os
import warnings
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext
from ._common import (
    BACKEND_CHOICES,
    IntPair,
    autocast_dtype,
    autocast_to,
    check_backend,
    check_devices,
    check_dtypes,
    check_finite,
    check_tensor,
    compute_dtype,
    cpu_has_native_bf16,
    grad_layout,
    memory_format,
    mmcv_has_cuda,
    pair,
)

CPU_KERNELS = ('compiled', 'public')

# Upper bound on one column buffer (P_chunk x K*C); tests lower it to force chunking. Measured fastest
# among 4..64 MiB on CPU: larger buffers are mapped and page-faulted afresh on every call.
CHUNK_BYTES = 16 * 2**20


def output_size(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> tuple[int, int]:
    """(H_out, W_out) of a convolution over ``size`` (H, W), as :class:`torch.nn.Conv2d` computes it."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1  # type: ignore[return-value]
                 for n, k, s, p, d in zip(size, kernel, stride, padding, dilation, strict=True))


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
    if _ext.load() is not None:
        return 'compiled'
    if requested == 'compiled':
        raise RuntimeError(f'the compiled CPU kernel does not load ({_ext.missing_reason()}): build it with '
                           f'{_ext.HOW_TO_BUILD}, or use the public kernel')
    if not _noticed[0]:
        _noticed[0] = True
        warnings.warn(f'dcn_det: no compiled CPU kernel ({_ext.missing_reason()}); deformable convs use the '
                      f'slower public-API path. To build it: {_ext.HOW_TO_BUILD}', stacklevel=2)
    return 'public'


def deform_conv2d(input: Tensor,
                  offset: Tensor,
                  weight: Tensor,
                  bias: Optional[Tensor] = None,
                  stride: IntPair = (1, 1),
                  padding: IntPair = (0, 0),
                  dilation: IntPair = (1, 1),
                  mask: Optional[Tensor] = None,
                  *,
                  backend: str = 'auto') -> Tensor:
    """Deformable convolution v1 (``mask=None``) or v2 (modulated, with ``mask``).

    Same arguments and semantics as :func:`torchvision.ops.deform_conv2d`; ``groups`` is
    ``C_in // weight.shape[1]`` and ``offset_groups`` is ``offset.shape[1] // (2 * kh * kw)``.

    Args:
        input (Tensor[N, C_in, H, W]): input feature map.
        offset (Tensor[N, 2 * offset_groups * kh * kw, H_out, W_out]): sampling offsets; for offset
            group g and kernel point k (row-major over the kernel) channels
            ``2 * (g * kh * kw + k)`` and ``+ 1`` hold (dy, dx) in pixels.
        weight (Tensor[C_out, C_in // groups, kh, kw]): convolution weights.
        bias (Tensor[C_out], optional): added to the output.
        stride (int or Tuple[int, int]): distance between convolution centres.
        padding (int or Tuple[int, int]): implicit zero padding on both sides.
        dilation (int or Tuple[int, int]): spacing between kernel elements.
        mask (Tensor[N, offset_groups * kh * kw, H_out, W_out], optional): modulation scalar of each
            sample (DCNv2); ``None`` is DCNv1 (all ones).
        backend (str): ``'auto'``, ``'native'``, ``'mmcv'`` or ``'torchvision'`` (see module doc).

    Returns:
        Tensor[N, C_out, H_out, W_out], with ``input``'s dtype and memory format (under autocast:
        bfloat16 under CPU bfloat16 autocast on a CPU with native bfloat16, else float32).

    Raises:
        NonFiniteError: ``offset`` or ``mask`` holds a NaN or an infinity.
    """
    geom = check_args(input, offset, weight, bias, stride, padding, dilation, mask)
    if torch.is_autocast_enabled(input.device.type):
        input, offset, weight, bias, mask = autocast_to(autocast_dtype(input.device), input, offset, weight, bias,
                                                        mask)
    backend = resolve_backend(backend, input.device)
    if backend == 'native':  # the custom op checks offset and mask itself (so that compiled graphs do too)
        return native_deform_conv2d(input, offset, mask, weight, bias, geom)
    check_finite(offset, 'offset')
    check_finite(mask, 'mask')
    # their kernels take contiguous NCHW tensors: output and gradients go back to the layouts that came in
    fmt = memory_format(input)
    input, offset, mask, weight, bias = (grad_layout(t) for t in (input, offset, mask, weight, bias))
    if backend == 'mmcv' and input.shape[0] > 0:  # mmcv refuses an empty batch ("input is too small")
        out = _mmcv_deform_conv2d(input, offset, mask, weight, bias, geom)
    else:
        out = _torchvision_deform_conv2d(input, offset, mask, weight, bias, geom)
    return out.contiguous(memory_format=fmt)


def resolve_backend(backend: str, device: torch.device) -> str:
    if check_backend(backend, BACKEND_CHOICES) != 'auto':
        return backend
    if device.type == 'cuda':
        return 'mmcv' if mmcv_has_cuda() else 'torchvision'
    return 'native'


def check_args(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor], stride: IntPair,
               padding: IntPair, dilation: IntPair, mask: Optional[Tensor]) -> Geometry:
    """Every argument check of :func:`deform_conv2d`; returns the convolution's geometry."""
    check_tensor(input, 'input', 4)
    check_tensor(offset, 'offset', 4)
    check_tensor(weight, 'weight', 4)
    check_tensor(bias, 'bias', 1, optional=True)
    check_tensor(mask, 'mask', 4, optional=True)
    check_devices(input, offset=offset, weight=weight, bias=bias, mask=mask)
    check_dtypes(input, offset=offset, weight=weight, bias=bias, mask=mask)
    stride_, padding_, dilation_ = (pair(stride, 'stride', 1), pair(padding, 'padding', 0),
                                    pair(dilation, 'dilation', 1))
    n, c_in, h, w = input.shape
    c_out, c_per_group, kh, kw = weight.shape
    if c_per_group == 0 or kh == 0 or kw == 0 or c_in % c_per_group:
        raise ValueError(f'weight must have shape (C_out, C_in // groups, kh, kw) with groups dividing '
                         f'C_in = {c_in}, got {tuple(weight.shape)}')
    groups = c_in // c_per_group
    if c_out % groups:
        raise ValueError(f'weight has C_out = {c_out} output channels, which must be divisible by '
                         f'groups = C_in // weight.shape[1] = {groups}')
    if bias is not None and bias.shape[0] != c_out:
        raise ValueError(f'bias must have C_out = {c_out} elements, got {tuple(bias.shape)}')
    h_out, w_out = output_size((h, w), (kh, kw), stride_, padding_, dilation_)
    if h_out <= 0 or w_out <= 0:
        raise ValueError(f'input of spatial size ({h}, {w}) is too small for a {kh}x{kw} kernel with '
                         f'padding {padding_} and dilation {dilation_} (output would be '
                         f'({h_out}, {w_out})): pad the input or use a smaller kernel')
    k2 = 2 * kh * kw
    offset_groups = offset.shape[1] // k2
    if (offset.shape[1] % k2 or offset_groups == 0
            or tuple(offset.shape) != (n, offset.shape[1], h_out, w_out)):
        groups_note = f'offset_groups = {offset_groups}' if offset_groups and not offset.shape[1] % k2 \
            else f'a multiple of {k2}, one block per offset group'
        want = max(offset_groups, 1) * k2
        raise ValueError(f'offset must have 2*offset_groups*kh*kw = {want} channels ({groups_note}) and '
                         f'spatial size (H_out, W_out) = ({h_out}, {w_out}), i.e. shape '
                         f'({n}, {want}, {h_out}, {w_out}), got {tuple(offset.shape)}')
    if c_in % offset_groups:
        raise ValueError(f'offset has {offset.shape[1]} channels, i.e. offset_groups = {offset_groups}, '
                         f'which must divide C_in = {c_in}')
    if mask is not None and tuple(mask.shape) != (n, offset_groups * kh * kw, h_out, w_out):
        raise ValueError(f'mask must have offset_groups*kh*kw = {offset_groups * kh * kw} channels and '
                         f'spatial size (H_out, W_out) = ({h_out}, {w_out}), i.e. shape '
                         f'({n}, {offset_groups * kh * kw}, {h_out}, {w_out}), got {tuple(mask.shape)}')
    return Geometry(stride_, padding_, dilation_, groups, offset_groups, (h_out, w_out))


def _cast_for_kernels(input: Tensor, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """One dtype for the compiled kernels: they take half on CUDA only and no bfloat16 at all."""
    all_ = (input,) + tensors
    dtype = torch.float16 if input.is_cuda and input.dtype == torch.float16 else compute_dtype(*all_)
    return tuple(None if t is None else t.to(dtype).contiguous() for t in all_)


def _mmcv_deform_conv2d(input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor,
                        bias: Optional[Tensor], geom: Geometry) -> Tensor:
    from mmcv.ops import deform_conv2d as mmcv_deform_conv2d
    from mmcv.ops import modulated_deform_conv2d

    x, off, m, w, b = _cast_for_kernels(input, offset, mask, weight, bias)
    with torch.autocast(input.device.type, enabled=False):
        if m is not None:
            out = modulated_deform_conv2d(x, off, m, w, b, geom.stride, geom.padding, geom.dilation,
                                          geom.groups, geom.offset_groups)
        else:
            # mmcv's DCNv1 has no bias and processes the batch in steps that must divide it
            n = x.shape[0]
            step = max(d for d in range(1, min(n, 32) + 1) if n % d == 0)
            out = mmcv_deform_conv2d(x, off, w, geom.stride, geom.padding, geom.dilation, geom.groups,
                                     geom.offset_groups, False, step)
            if b is not None:
                out = out + b.view(1, -1, 1, 1)
    return out.to(input.dtype)


def _torchvision_deform_conv2d(input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor,
                               bias: Optional[Tensor], geom: Geometry) -> Tensor:
    from torchvision.ops import deform_conv2d as tv_deform_conv2d

    x, off, m, w, b = _cast_for_kernels(input, offset, mask, weight, bias)
    with torch.autocast(input.device.type, enabled=False):
        out = tv_deform_conv2d(x, off, w, b, geom.stride, geom.padding, geom.dilation, m)
    return out.to(input.dtype)


# ------------------------------------------------------------------------------------------------
# The custom op


def native_deform_conv2d(input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor,
                         bias: Optional[Tensor], geom: Geometry) -> Tensor:
    """Call the custom op with checked arguments (:func:`dcn_det.ops.deform_conv2d` checks them)."""
    return torch.ops.dcn_det.deform_conv2d(input, offset, mask, weight, bias, list(geom.stride),
                                           list(geom.padding), list(geom.dilation), geom.groups,
                                           geom.offset_groups)


def _geometry(input: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int], groups: int, offset_groups: int) -> Geometry:
    kh, kw = weight.shape[2:]
    h_out, w_out = output_size(input.shape[2:], (kh, kw), stride, padding, dilation)
    return Geometry(tuple(stride), tuple(padding), tuple(dilation), groups, offset_groups, (h_out, w_out))


def _use_compiled(t: Tensor) -> bool:
    return t.device.type == 'cpu' and cpu_kernel() == 'compiled'


def _kernel_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """The dtype the kernel computes in: bfloat16 for bfloat16 tensors in the compiled CPU kernel on a CPU
    with native bfloat16, else :func:`compute_dtype`."""
    if (all(t is None or t.dtype == torch.bfloat16 for t in tensors) and _use_compiled(tensors[0])
            and cpu_has_native_bf16()):
        return torch.bfloat16
    return compute_dtype(*tensors)


@torch.library.custom_op('dcn_det::deform_conv2d', mutates_args=())
def deform_conv2d_op(input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor,
                     bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int], groups: int, offset_groups: int) -> Tensor:
    """input (Tensor[N, C, H, W]) -> Tensor[N, C_out, H_out, W_out]; see the module docstring."""
    check_finite(offset, 'offset')
    check_finite(mask, 'mask')
    geom = _geometry(input, weight, stride, padding, dilation, groups, offset_groups)
    dtype = _kernel_dtype(input, offset, mask, weight, bias)
    args = [None if t is None else t.to(dtype) for t in (input, offset, mask, weight, bias)]
    with torch.autocast(input.device.type, enabled=False):
        if _use_compiled(input):
            out = _ext.load().deform_conv2d_forward(*args, *geom.stride, *geom.padding, *geom.dilation,
                                                         groups, offset_groups, CHUNK_BYTES)
        else:
            out = public_forward(*args, geom, CHUNK_BYTES)
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
    dtype = _kernel_dtype(input, offset, mask, weight, bias)
    args = [None if t is None else t.to(dtype) for t in (input, offset, mask, weight)]
    needs = [bool(v) for v in needs]
    needs[2] = needs[2] and mask is not None
    needs[4] = needs[4] and bias is not None
    with torch.autocast(input.device.type, enabled=False):
        if _use_compiled(input):
            grads = _ext.load().deform_conv2d_backward(
                grad_out.to(dtype), *args, bias is not None, *geom.stride, *geom.padding, *geom.dilation, groups,
                offset_groups, CHUNK_BYTES, needs)
        else:
            grads = public_backward(grad_out.to(dtype), *args, geom, needs, CHUNK_BYTES)
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


# ------------------------------------------------------------------------------------------------
# The public-API kernel: the fallback of the compiled CPU kernel, and the kernel on every other device.
#
# The input becomes a zero-padded channels-last table of pixel rows; every bilinear sample is then a
# bag of four weighted rows, gathered by :func:`torch.nn.functional.embedding_bag` with the mask
# folded into the per-sample weights, and the convolution is one ``(P, K*C) @ (K*C, C_out)`` matmul
# over those columns. In the backward the gather is a sparse matrix (samples x table rows, four
# bilinear weights a row): its transpose times the column gradient is the input gradient, and one
# sampled dense-dense product (the column gradient dotted with each sample's corner rows) gives the
# offset and mask gradients in closed form. Work is chunked over output rows so that a column buffer
# stays under ``chunk_bytes`` whatever the image size, and the columns are recomputed in the backward
# rather than kept, as mmcv does.
#
# Layout: the table has one row per (image, padded pixel, offset group), holding that group's C/DG
# channels: (N, H+2, W+2, C) zero-padded by one pixel, viewed as (N*(H+2)*(W+2)*DG, C/DG). A sample
# inside the open box -1 < h < H, -1 < w < W reads the 2x2 patch whose top-left corner is (floor(h),
# floor(w)); with the padding every such corner row exists and corners outside the image read zeros.
# A sample outside is parked at (-1, -1): its only weighted corner is then a padding row, so it and
# its gradients are 0, as in mmcv. Arguments: float32 or float64, one dtype, checked by the caller;
# ``geom`` is a :class:`Geometry`.


class _Sampler:
    """Table rows and weights of the samples of a range of output rows (r over N*H_out)."""

    def __init__(self, shape: torch.Size, kernel: tuple[int, int], geom, offset: Tensor, mask: Optional[Tensor]):
        n, _, self.height, self.width = shape
        kh, kw = kernel
        self.k, self.dg = kh * kw, geom.offset_groups
        self.h_out, self.w_out = geom.out_size
        dev, dtype = offset.device, offset.dtype
        (sh, sw), (ph, pw), (dh, dw) = geom.stride, geom.padding, geom.dilation
        kernel_h = torch.arange(kh, device=dev).repeat_interleave(kw) * dh
        kernel_w = torch.arange(kw, device=dev).repeat(kh) * dw
        # integer grid + offset, summed in the same order as the kernels (int + float)
        self.base_h = ((torch.arange(self.h_out, device=dev) * sh - ph)[:, None] + kernel_h).to(dtype)
        self.base_w = ((torch.arange(self.w_out, device=dev) * sw - pw)[:, None] + kernel_w).to(dtype)
        # (N*H_out, W_out, K, DG, 2) and (N*H_out, W_out, K, DG): output rows first, to chunk over them
        self.offset = offset.view(n, self.dg, self.k, 2, self.h_out, self.w_out) \
            .permute(0, 4, 5, 2, 1, 3).reshape(n * self.h_out, self.w_out, self.k, self.dg, 2)
        self.mask = None if mask is None else mask.view(n, self.dg, self.k, self.h_out, self.w_out) \
            .permute(0, 3, 4, 2, 1).reshape(n * self.h_out, self.w_out, self.k, self.dg)
        row = (self.width + 2) * self.dg  # table rows per padded image row
        self.image_rows = (self.height + 2) * row
        self.corners = torch.tensor([0, self.dg, row, row + self.dg], device=dev)

    def images(self, r0: int, r1: int) -> tuple[int, int]:
        """The images [n0, n1) that output rows [r0, r1) read."""
        return r0 // self.h_out, (r1 - 1) // self.h_out + 1

    def __call__(self, r0: int, r1: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Output rows [r0, r1) -> idx (B, 4), weights (B, 4), lh, lw (B,), B = (r1-r0)*W_out*K*DG.

        ``idx`` are rows of the table of images [n0, n1) for the corners top-left, top-right,
        bottom-left, bottom-right, and ``weights`` their bilinear weights (without the mask); lh, lw
        are the fractional parts of the sample position.
        """
        rows = torch.arange(r0, r1, device=self.offset.device)
        off = self.offset[r0:r1]
        h = self.base_h[rows % self.h_out][:, None, :, None] + off[..., 0]
        w = self.base_w[None, :, :, None] + off[..., 1]
        inside = (h > -1) & (h < self.height) & (w > -1) & (w < self.width)
        h = torch.where(inside, h, -1)
        w = torch.where(inside, w, -1)
        h0, w0 = h.floor(), w.floor()
        lh, lw = h - h0, w - w0
        # padded coordinates of the top-left corner are (h0 + 1, w0 + 1)
        image = (rows // self.h_out - r0 // self.h_out)[:, None, None, None] * self.image_rows
        top_left = image + ((h0.long() + 1) * (self.width + 2) + w0.long() + 1) * self.dg \
            + torch.arange(self.dg, device=h.device)
        idx = top_left.unsqueeze(-1) + self.corners
        wy = torch.stack((1 - lh, lh), -1)
        wts = wy.unsqueeze(-1) * torch.stack((1 - lw, lw), -1).unsqueeze(-2)
        return idx.reshape(-1, 4), wts.reshape(-1, 4), lh.reshape(-1), lw.reshape(-1)

    def mask_rows(self, r0: int, r1: int) -> Optional[Tensor]:
        return None if self.mask is None else self.mask[r0:r1].reshape(-1)


def _table(input: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, H+2, W+2, C) zero-padded channels-last copy."""
    n, c, h, w = input.shape
    table = input.new_zeros(n, h + 2, w + 2, c)
    table[:, 1:-1, 1:-1].copy_(input.permute(0, 2, 3, 1))
    return table


def _chunks(n_rows: int, row_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Ranges of output rows whose column buffers (``row_bytes`` per row) fit ``chunk_bytes``."""
    step = max(1, chunk_bytes // row_bytes)
    return [(r0, min(r0 + step, n_rows)) for r0 in range(0, n_rows, step)]


def _weight_matrix(weight: Tensor, groups: int) -> Tensor:
    """(C_out, C_in/G, kh, kw) -> (G, C_out/G, kh*kw*C_in/G), matching the column layout (K, C)."""
    c_out, cg, kh, kw = weight.shape
    # reshape, not view: a weight of any strides (a permuted copy cannot merge kh and kw in place)
    return weight.reshape(groups, c_out // groups, cg, kh * kw).transpose(2, 3).reshape(groups, c_out // groups,
                                                                                        kh * kw * cg)


def _grouped(cols: Tensor, k: int, groups: int) -> Tensor:
    """(P, K*C) -> (G, P, K*C/G) for a grouped matmul (a view when G == 1)."""
    if groups == 1:
        return cols.unsqueeze(0)
    return cols.view(cols.shape[0], k, groups, -1).permute(2, 0, 1, 3).reshape(groups, cols.shape[0], -1)


def _ungrouped(cols: Tensor, k: int) -> Tensor:
    """Inverse of :func:`_grouped`: (G, P, K*C/G) -> (P, K*C)."""
    groups, p, _ = cols.shape
    if groups == 1:
        return cols[0]
    return cols.view(groups, p, k, -1).permute(1, 2, 0, 3).reshape(p, -1)


def _gather(tab: Tensor, idx: Tensor, psw: Tensor) -> Tensor:
    """out[b] = sum_j psw[b, j] * tab[idx[b, j]] (B, C)."""
    return F.embedding_bag(idx, tab, per_sample_weights=psw, mode='sum')


def _gather_matrix(idx: Tensor, psw: Tensor, rows: int) -> Tensor:
    """The gather as a sparse CSR matrix (B, rows): four entries per sample, columns increasing."""
    crow = torch.arange(0, idx.numel() + 1, 4, device=idx.device)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter('ignore', UserWarning)
        return torch.sparse_csr_tensor(crow, idx.reshape(-1), psw.reshape(-1), (idx.shape[0], rows))


def public_forward(input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
            geom, chunk_bytes: int) -> Tensor:
    """Tensor[N, C_out, H_out, W_out] (channels-last)."""
    n, c, _, _ = input.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = geom.out_size
    g = geom.groups
    table = _table(input)
    sampler = _Sampler(input.shape, (kh, kw), geom, offset, mask)
    w_mat = _weight_matrix(weight, g)
    # written as rows of output pixels into a channels-last tensor of its own (not a view: an op's output
    # may be modified in place)
    result = torch.empty(n, c_out, h_out, w_out, dtype=input.dtype, device=input.device,
                         memory_format=torch.channels_last)
    out = result.permute(0, 2, 3, 1).view(n * h_out * w_out, c_out)
    for r0, r1 in _chunks(n * h_out, w_out * kh * kw * c * table.element_size(), chunk_bytes):
        n0, n1 = sampler.images(r0, r1)
        idx, wts, _, _ = sampler(r0, r1)
        m = sampler.mask_rows(r0, r1)
        tab = table[n0:n1].view(-1, c // sampler.dg)
        cols = _gather(tab, idx, wts if m is None else wts * m[:, None]).view((r1 - r0) * w_out, -1)
        dst = out[r0 * w_out:r1 * w_out]
        if g == 1:
            if bias is None:
                torch.mm(cols, w_mat[0].t(), out=dst)
            else:
                torch.addmm(bias, cols, w_mat[0].t(), out=dst)
        else:
            res = torch.bmm(_grouped(cols, kh * kw, g), w_mat.transpose(1, 2))
            if bias is not None:
                res = res + bias.view(g, 1, c_out // g)
            dst.copy_(res.transpose(0, 1).reshape(dst.shape))
    return result


class _Grads(NamedTuple):
    """Gradient accumulators of the backward (None where not needed)."""
    table: Optional[Tensor]   # (N, H+2, W+2, C)
    offset: Optional[Tensor]  # (N*H_out, W_out, K, DG, 2)
    mask: Optional[Tensor]    # (N*H_out, W_out, K, DG)
    w_mat: Optional[Tensor]   # (G, C_out/G, K*C/G)


def public_backward(grad_out: Tensor, input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor, geom,
             needs: list[bool], chunk_bytes: int) -> list[Optional[Tensor]]:
    """Gradients of (input, offset, mask, weight, bias), None where ``needs`` is False."""
    need_input, need_offset, need_mask, need_weight, need_bias = needs
    n, c, _, _ = input.shape
    c_out, cg, kh, kw = weight.shape
    h_out, w_out = geom.out_size
    k, g, dg = kh * kw, geom.groups, geom.offset_groups
    go = grad_out.permute(0, 2, 3, 1).reshape(n * h_out * w_out, c_out)
    grad_bias = go.sum(0) if need_bias else None
    if not (need_input or need_offset or need_mask or need_weight):
        return [None, None, None, None, grad_bias]

    table = _table(input)
    sampler = _Sampler(input.shape, (kh, kw), geom, offset, mask)
    w_mat = _weight_matrix(weight, g)
    acc = _Grads(torch.zeros_like(table) if need_input else None,
                 table.new_empty(n * h_out, w_out, k, dg, 2) if need_offset else None,
                 table.new_empty(n * h_out, w_out, k, dg) if need_mask else None,
                 torch.zeros_like(w_mat) if need_weight else None)
    for r0, r1 in _chunks(n * h_out, w_out * k * c * table.element_size(), chunk_bytes):
        _backward_chunk(go[r0 * w_out:r1 * w_out], table, sampler, r0, r1, w_mat, acc)

    grad_input = grad_offset = grad_mask = grad_weight = None
    if need_input:
        grad_input = acc.table[:, 1:-1, 1:-1].permute(0, 3, 1, 2)
    if need_offset:
        grad_offset = acc.offset.view(n, h_out, w_out, k, dg, 2).permute(0, 4, 3, 5, 1, 2) \
            .reshape(n, dg * k * 2, h_out, w_out)
    if need_mask:
        grad_mask = acc.mask.view(n, h_out, w_out, k, dg).permute(0, 4, 3, 1, 2).reshape(n, dg * k, h_out, w_out)
    if need_weight:
        grad_weight = acc.w_mat.view(c_out, k, cg).transpose(1, 2).reshape(c_out, cg, kh, kw)
    return [grad_input, grad_offset, grad_mask, grad_weight, grad_bias]


def _backward_chunk(go: Tensor, table: Tensor, sampler: _Sampler, r0: int, r1: int, w_mat: Tensor,
                    acc: _Grads) -> None:
    """Accumulate the gradients from output rows [r0, r1), whose output gradient is ``go`` (P, C_out)."""
    n0, n1 = sampler.images(r0, r1)
    k, dg, g = sampler.k, sampler.dg, w_mat.shape[0]
    tab = table[n0:n1].view(-1, table.shape[-1] // dg)
    idx, wts, lh, lw = sampler(r0, r1)
    m = sampler.mask_rows(r0, r1)
    psw = wts if m is None else wts * m[:, None]
    go_g = go.view(go.shape[0], g, -1).transpose(0, 1)  # (G, P, C_out/G)
    if acc.w_mat is not None:  # columns recomputed rather than kept from the forward, as mmcv
        cols = _gather(tab, idx, psw).view(go.shape[0], -1)
        if g == 1:
            acc.w_mat[0].addmm_(go.t(), cols)
        else:
            acc.w_mat.baddbmm_(go_g.transpose(1, 2), _grouped(cols, k, g))
        del cols  # before grad_cols, so a chunk holds one column buffer at a time
    if acc.table is None and acc.offset is None and acc.mask is None:
        return
    grad_cols = torch.mm(go, w_mat[0]) if g == 1 else _ungrouped(torch.bmm(go_g, w_mat), k)
    grad_cols = grad_cols.reshape(idx.shape[0], -1)  # (B, C/DG): one row per sample (a copy only if strided)
    # The gather is the sparse (B, table rows) matrix of bilinear weights times the table: its transpose
    # scatters the column gradient into the table, and the sampled product <grad of sample b, corner row j>
    # (the gradient of the per-sample weights) gives the mask and offset gradients.
    gather = _gather_matrix(idx, psw, tab.shape[0])
    if acc.table is not None:
        acc.table[n0:n1].view(tab.shape).add_(torch.sparse.mm(gather.t().to_sparse_csr(), grad_cols))
    s = torch.sparse.sampled_addmm(gather, grad_cols, tab.t(), beta=0.0).values().view(-1, 4)
    if acc.mask is not None:
        acc.mask[r0:r1] = (s * wts).sum(1).view(acc.mask[r0:r1].shape)
    if acc.offset is not None:
        if m is not None:
            s = s * m[:, None]
        s_tl, s_tr, s_bl, s_br = s.unbind(1)
        grad_h = (1 - lw) * (s_bl - s_tl) + lw * (s_br - s_tr)
        grad_w = (1 - lh) * (s_tr - s_tl) + lh * (s_br - s_bl)
        acc.offset[r0:r1] = torch.stack((grad_h, grad_w), -1).view(acc.offset[r0:r1].shape)
