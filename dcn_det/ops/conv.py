"""``deform_conv2d``: deformable convolution, DCNv1 and DCNv2 (modulated), behind one functional.

A drop-in for :func:`torchvision.ops.deform_conv2d` (same arguments, offset layout and inference of
``groups``/``offset_groups`` from the shapes) with a ``backend`` switch:

- ``'native'``: dcn_det's own op, ``torch.ops.dcn_det.deform_conv2d`` (a ``torch.library`` custom
  op: ``torch.compile`` traces it whole, it has an ONNX translation). On the CPU it runs the compiled
  kernel (:mod:`dcn_det.ops.kernels`), or, where that is not built, a path on public torch functions;
  on other devices the public path. Float64 too (gradcheck).
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
"""
from typing import Optional

import torch
from torch import Tensor

from ._common import (
    IntPair,
    autocast_to_float32,
    check_backend,
    check_devices,
    check_dtypes,
    check_finite,
    check_tensor,
    compute_dtype,
    grad_layout,
    memory_format,
    mmcv_has_cuda,
    pair,
)
from .kernels.conv_native import Geometry, native_deform_conv2d

BACKENDS = ('native', 'mmcv', 'torchvision')
BACKEND_CHOICES = ('auto',) + BACKENDS


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
        Tensor[N, C_out, H_out, W_out], with ``input``'s dtype (float32 under autocast) and memory
        format.

    Raises:
        NonFiniteError: ``offset`` or ``mask`` holds a NaN or an infinity.
    """
    geom = check_args(input, offset, weight, bias, stride, padding, dilation, mask)
    input, offset, weight, bias, mask = autocast_to_float32(input, offset, weight, bias, mask)
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
    h_out = (h + 2 * padding_[0] - dilation_[0] * (kh - 1) - 1) // stride_[0] + 1
    w_out = (w + 2 * padding_[1] - dilation_[1] * (kw - 1) - 1) // stride_[1] + 1
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
