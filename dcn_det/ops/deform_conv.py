"""Deformable convolution, DCNv1 and DCNv2 (modulated), behind one functional with three backends.

``deform_conv2d`` is a drop-in for :func:`torchvision.ops.deform_conv2d` (same arguments, offset
layout and inference of ``groups``/``offset_groups`` from the shapes) with a ``backend`` switch:

- ``'native'``: this module's pure-PyTorch operator (any device; float64 too, for gradcheck), the
  fastest of the three on CPU (``benchmarks/bench_deform_conv.py``). The input is copied once into a
  zero-padded channels-last table of pixel rows; every bilinear sample is then a bag of four weighted
  rows, gathered by the kernel behind ``F.embedding_bag`` with the mask folded into the per-sample
  weights, and the convolution is one ``(P, K*C) @ (K*C, C_out)`` matmul over those columns. The
  backward uses the kernels autograd uses for ``embedding_bag``: a sorted scatter of the column
  gradient gives the input gradient, and per-row dot products (column gradient . corner row) give
  the offset and mask gradients in closed form. Work is chunked over output rows so that a column
  buffer stays under ``_CHUNK_BYTES`` (16 MiB) whatever the image size, and the columns are
  recomputed in the backward rather than kept, as mmcv does; the peak extra memory of a
  forward+backward is one chunk's columns plus a few activation-sized buffers (padded input table,
  its gradient, output-gradient rows).
- ``'mmcv'``: mmcv's compiled kernels (``modulated_deform_conv2d``; ``deform_conv2d`` for DCNv1).
- ``'torchvision'``: :func:`torchvision.ops.deform_conv2d`.
- ``'auto'``: native on CPU; on CUDA mmcv when mmcv was compiled with CUDA, else torchvision.

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

Precision: half and bfloat16 tensors are computed in float32 (float64 stays float64) and the result
has ``input``'s dtype; autocast is disabled inside (the op decides its own precision), so under
``torch.autocast`` a float32 input gives a float32 output whatever dtype the offsets come in.

torch.compile: dynamo traces the native op whole (its autograd.Function included) with
``aot_eager`` and with ``inductor``: one graph, no graph break (``torch._dynamo.explain``). While
compiling, the oneDNN matmul fast path is left out (see ``_Linear``). The backward is
``once_differentiable`` (no double backward, as in mmcv). ``backend='mmcv'`` graph-breaks at each
call (dynamo cannot trace mmcv's pybind extension); ``'torchvision'`` is traced.
"""
import functools
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

BACKENDS = ('native', 'mmcv', 'torchvision')
_BACKEND_CHOICES = ('auto',) + BACKENDS

# Upper bound on the native column buffer (P_chunk x K*C) per chunk; tests lower it to force chunking.
# 16 MiB was the fastest of 4..64 MiB on CPU: buffers above glibc's 32 MiB mmap threshold are mapped
# and page-faulted afresh on every call.
_CHUNK_BYTES = 16 * 2**20
# Output pixels per call from which the native op runs its big matmuls on oneDNN (see _Linear).
_ONEDNN_MIN_ROWS = 1024

_IntPair = Union[int, tuple[int, int]]


class _Geometry(NamedTuple):
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    offset_groups: int
    out_size: tuple[int, int]


def deform_conv2d(input: Tensor,
                  offset: Tensor,
                  weight: Tensor,
                  bias: Optional[Tensor] = None,
                  stride: _IntPair = (1, 1),
                  padding: _IntPair = (0, 0),
                  dilation: _IntPair = (1, 1),
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
        Tensor[N, C_out, H_out, W_out], with ``input``'s dtype.
    """
    geom = _check_args(input, offset, weight, bias, stride, padding, dilation, mask)
    backend = _resolve_backend(backend, input.device)
    if backend == 'torchvision':
        return _torchvision_deform_conv2d(input, offset, mask, weight, bias, geom)
    if backend == 'mmcv' and input.shape[0] > 0:  # mmcv refuses an empty batch ("input is too small")
        return _mmcv_deform_conv2d(input, offset, mask, weight, bias, geom)
    return _NativeDeformConv2d.apply(input, offset, mask, weight, bias, geom)


def check_backend(backend: str) -> str:
    """Return ``backend`` if it names a backend, else raise ValueError listing the valid names."""
    if backend not in _BACKEND_CHOICES:
        raise ValueError(f'backend must be one of {_BACKEND_CHOICES}, got {backend!r}')
    return backend


def _resolve_backend(backend: str, device: torch.device) -> str:
    if check_backend(backend) != 'auto':
        return backend
    if device.type == 'cuda':
        return 'mmcv' if _mmcv_has_cuda() else 'torchvision'
    return 'native'


@functools.cache
def _mmcv_has_cuda() -> bool:
    try:
        from mmcv.ops import get_compiling_cuda_version
    except ImportError:
        return False
    return get_compiling_cuda_version() != 'not available'


# ----------------------------------------------------------------------------------------------
# argument checks


def _pair(value: _IntPair, name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, int):
        pair = (value, value)
    else:
        pair = tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f'{name} must be an int or a pair of ints, got {value!r}')
    if min(pair) < minimum:
        raise ValueError(f'{name} must be >= {minimum}, got {value!r}')
    return pair  # type: ignore[return-value]


def _check_tensor(t: Optional[Tensor], name: str, dim: int, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f'{name} must be a Tensor, got {type(t).__name__}')
    if not t.is_floating_point():
        raise TypeError(f'{name} must be a floating-point tensor (float16/bfloat16/float32/float64), '
                        f'got {t.dtype}')
    if t.dim() != dim:
        raise ValueError(f'{name} must be a {dim}D tensor, got shape {tuple(t.shape)}')


def _check_args(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor],
                stride: _IntPair, padding: _IntPair, dilation: _IntPair,
                mask: Optional[Tensor]) -> _Geometry:
    _check_tensor(input, 'input', 4)
    _check_tensor(offset, 'offset', 4)
    _check_tensor(weight, 'weight', 4)
    _check_tensor(bias, 'bias', 1, optional=True)
    _check_tensor(mask, 'mask', 4, optional=True)
    for name, t in (('offset', offset), ('weight', weight), ('bias', bias), ('mask', mask)):
        if t is not None and t.device != input.device:
            raise ValueError(f'{name} is on {t.device} but input is on {input.device}: '
                             f'move all tensors to one device')
    stride_, padding_, dilation_ = (_pair(stride, 'stride', 1), _pair(padding, 'padding', 0),
                                    _pair(dilation, 'dilation', 1))
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
    return _Geometry(stride_, padding_, dilation_, groups, offset_groups, (h_out, w_out))


def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


# ----------------------------------------------------------------------------------------------
# native backend
#
# Layout: the input becomes a table of rows, one per (image, padded pixel, offset group), holding that
# group's C/DG channels: (N, H+2, W+2, C) zero-padded by one pixel, viewed as (N*(H+2)*(W+2)*DG, C/DG).
# A sample inside the open box -1 < h < H, -1 < w < W reads the 2x2 patch whose top-left corner is
# (floor(h), floor(w)); with the padding every such corner row exists and corners outside the image
# read zeros, so no per-corner test is needed. A sample outside is parked at (-1, -1): its only
# weighted corner is then a padding row, so it and its gradients are 0, as in mmcv.


class _Sampler:
    """Table rows and weights of the samples of a range of output rows (r over N*H_out)."""

    def __init__(self, shape: torch.Size, kernel: tuple[int, int], geom: _Geometry, offset: Tensor,
                 mask: Optional[Tensor], dtype: torch.dtype):
        n, _, self.height, self.width = shape
        kh, kw = kernel
        self.k, self.dg = kh * kw, geom.offset_groups
        self.h_out, self.w_out = geom.out_size
        dev = offset.device
        (sh, sw), (ph, pw), (dh, dw) = geom.stride, geom.padding, geom.dilation
        kernel_h = torch.arange(kh, device=dev).repeat_interleave(kw) * dh
        kernel_w = torch.arange(kw, device=dev).repeat(kh) * dw
        # integer grid + offset, summed in the same order as the kernels (int + float)
        self.base_h = ((torch.arange(self.h_out, device=dev) * sh - ph)[:, None] + kernel_h).to(dtype)
        self.base_w = ((torch.arange(self.w_out, device=dev) * sw - pw)[:, None] + kernel_w).to(dtype)
        # (N*H_out, W_out, K, DG, 2) and (N*H_out, W_out, K, DG): output rows first, to chunk over them
        self.offset = offset.view(n, self.dg, self.k, 2, self.h_out, self.w_out) \
            .permute(0, 4, 5, 2, 1, 3).to(dtype).reshape(n * self.h_out, self.w_out, self.k, self.dg, 2)
        self.mask = None if mask is None else mask.view(n, self.dg, self.k, self.h_out, self.w_out) \
            .permute(0, 3, 4, 2, 1).to(dtype).reshape(n * self.h_out, self.w_out, self.k, self.dg)
        row = (self.width + 2) * self.dg  # table rows per padded image row
        self.image_rows = (self.height + 2) * row
        self.corners = torch.tensor([0, self.dg, row, row + self.dg], device=dev)

    def images(self, r0: int, r1: int) -> tuple[int, int]:
        """The images [n0, n1) that output rows [r0, r1) read."""
        return r0 // self.h_out, (r1 - 1) // self.h_out + 1

    def __call__(self, r0: int, r1: int, masked: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Output rows [r0, r1) -> idx (B, 4), weights (B, 4), lh, lw (B,), B = (r1-r0)*W_out*K*DG.

        ``idx`` are rows of the table of images [n0, n1) for the corners top-left, top-right,
        bottom-left, bottom-right, and ``weights`` their bilinear weights, times the mask if
        ``masked``; lh, lw are the fractional parts of the sample position.
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
        if masked and self.mask is not None:
            wy = wy * self.mask[r0:r1].unsqueeze(-1)
        wts = wy.unsqueeze(-1) * torch.stack((1 - lw, lw), -1).unsqueeze(-2)
        return idx.reshape(-1, 4), wts.reshape(-1, 4), lh.reshape(-1), lw.reshape(-1)

    def mask_rows(self, r0: int, r1: int) -> Optional[Tensor]:
        return None if self.mask is None else self.mask[r0:r1].reshape(-1)


def _table(input: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, C, H, W) -> (N, H+2, W+2, C) zero-padded channels-last copy."""
    n, c, h, w = input.shape
    table = input.new_zeros(n, h + 2, w + 2, c, dtype=dtype)
    table[:, 1:-1, 1:-1].copy_(input.permute(0, 2, 3, 1))
    return table


def _chunks(n_rows: int, row_bytes: int) -> list[tuple[int, int]]:
    """Ranges of output rows whose column buffers (``row_bytes`` per row) fit ``_CHUNK_BYTES``."""
    step = max(1, _CHUNK_BYTES // row_bytes)
    return [(r0, min(r0 + step, n_rows)) for r0 in range(0, n_rows, step)]


def _weight_matrix(weight: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """(C_out, C_in/G, kh, kw) -> (G, C_out/G, kh*kw*C_in/G), matching the column layout (K, C).

    Only the last two dims swap (a cheap batched transpose); the matmuls take it transposed.
    """
    c_out, cg, kh, kw = weight.shape
    return weight.to(dtype).view(groups, c_out // groups, cg, kh * kw).transpose(2, 3) \
        .reshape(groups, c_out // groups, kh * kw * cg)


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


def _embedding_bag(table: Tensor, idx: Tensor, psw: Tensor) -> Tensor:
    """out[b] = sum_j psw[b, j] * table[idx[b, j]]: the aten kernel behind F.embedding_bag(mode='sum')."""
    bags = idx.shape[0]
    offsets = torch.arange(0, 4 * bags, 4, device=idx.device)
    return torch.ops.aten._embedding_bag_forward_only(table, idx.view(-1), offsets, False, 0, False,
                                                      psw.reshape(-1), False, -1)[0]


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and callable(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_available()


class _Linear:
    """``x @ w.T (+ bias)`` for one weight and many chunks of rows ``x``.

    On CPU in float32 with enough rows, oneDNN's linear (the kernel inductor uses) is ~15-40% faster
    than torch.mm here (MKL's sgemm; measured on AVX-512), once the weight is packed for it; the
    packing costs about one pass over the weight, so small problems keep torch.mm.
    """

    def __init__(self, w: Tensor, rows: int):
        self.w = w
        self.packed = None
        if (_ONEDNN and torch.backends.mkldnn.enabled and w.device.type == 'cpu' and w.dtype == torch.float32
                and rows >= _ONEDNN_MIN_ROWS and not torch.compiler.is_compiling()):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)

    def __call__(self, x: Tensor, bias: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, 'none', [], '')
            return y if out is None else out.copy_(y)
        if out is None:
            return torch.mm(x, self.w.t()) if bias is None else torch.addmm(bias, x, self.w.t())
        return torch.mm(x, self.w.t(), out=out) if bias is None else torch.addmm(bias, x, self.w.t(), out=out)


class _NativeDeformConv2d(torch.autograd.Function):

    @staticmethod
    def forward(ctx, input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor,
                bias: Optional[Tensor], geom: _Geometry) -> Tensor:
        ctx.geom = geom
        with torch.no_grad(), torch.autocast(input.device.type, enabled=False):
            out, w_mat = _native_forward(input, offset, mask, weight, bias, geom)
        ctx.save_for_backward(input, offset, mask, weight, bias, w_mat)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        input, offset, mask, weight, bias, w_mat = ctx.saved_tensors
        with torch.no_grad(), torch.autocast(input.device.type, enabled=False):
            grads = _native_backward(grad_out, input, offset, mask, weight, bias, w_mat, ctx.geom,
                                     ctx.needs_input_grad[:5])
        return (*grads, None)


def _native_forward(input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor,
                    bias: Optional[Tensor], geom: _Geometry) -> tuple[Tensor, Tensor]:
    """Output and the weight matrix (kept for the backward)."""
    dtype = _compute_dtype(input, offset, mask, weight, bias)
    n, c, _, _ = input.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = geom.out_size
    g = geom.groups
    table = _table(input, dtype)
    sampler = _Sampler(input.shape, (kh, kw), geom, offset, mask, dtype)
    w_mat = _weight_matrix(weight, g, dtype)
    bias_ = None if bias is None else bias.to(dtype).view(g, 1, c_out // g)
    linear = _Linear(w_mat[0], n * h_out * w_out) if g == 1 else None
    out = torch.empty(n * h_out * w_out, c_out, dtype=dtype, device=input.device)
    for r0, r1 in _chunks(n * h_out, w_out * kh * kw * c * table.element_size()):
        # one function call per chunk, so that its buffers are freed before the next chunk's
        _forward_chunk(table, sampler, r0, r1, w_mat, bias_, linear, out[r0 * w_out:r1 * w_out])
    out = out.view(n, h_out, w_out, c_out).permute(0, 3, 1, 2)
    return out.to(input.dtype).contiguous(memory_format=_memory_format(input)), w_mat


def _forward_chunk(table: Tensor, sampler: _Sampler, r0: int, r1: int, w_mat: Tensor,
                   bias: Optional[Tensor], linear: Optional[_Linear], out: Tensor) -> None:
    n0, n1 = sampler.images(r0, r1)
    idx, psw, _, _ = sampler(r0, r1)
    k, g = sampler.k, w_mat.shape[0]
    tab = table[n0:n1].view(-1, table.shape[-1] // sampler.dg)
    cols = _embedding_bag(tab, idx, psw).view(out.shape[0], -1)
    if linear is not None:
        linear(cols, None if bias is None else bias[0, 0], out=out)
    else:
        res = torch.bmm(_grouped(cols, k, g), w_mat.transpose(1, 2))
        out.copy_((res if bias is None else res + bias).transpose(0, 1).reshape(out.shape))


def _memory_format(t: Tensor) -> torch.memory_format:
    # follow the input's layout, as F.conv2d does
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class _Grads(NamedTuple):
    """Gradient accumulators of the native backward (None where not needed)."""
    table: Optional[Tensor]   # (N, H+2, W+2, C)
    offset: Optional[Tensor]  # (N*H_out, W_out, K, DG, 2)
    mask: Optional[Tensor]    # (N*H_out, W_out, K, DG)
    w_mat: Optional[Tensor]   # (G, C_out/G, K*C/G)


def _native_backward(grad_out: Tensor, input: Tensor, offset: Tensor, mask: Optional[Tensor],
                     weight: Tensor, bias: Optional[Tensor], w_mat: Tensor, geom: _Geometry,
                     needs: tuple[bool, ...]) -> tuple[Optional[Tensor], ...]:
    need_input, need_offset, need_mask, need_weight, need_bias = needs
    dtype = _compute_dtype(input, offset, mask, weight, bias)
    n, c, _, _ = input.shape
    c_out, cg, kh, kw = weight.shape
    h_out, w_out = geom.out_size
    k, g, dg = kh * kw, geom.groups, geom.offset_groups
    go = grad_out.to(dtype).permute(0, 2, 3, 1).reshape(n * h_out * w_out, c_out)
    grad_bias = go.sum(0).to(bias.dtype) if need_bias else None
    if not (need_input or need_offset or need_mask or need_weight):
        return None, None, None, None, grad_bias

    table = _table(input, dtype)
    sampler = _Sampler(input.shape, (kh, kw), geom, offset, mask, dtype)
    acc = _Grads(torch.zeros_like(table) if need_input else None,
                 table.new_empty(n * h_out, w_out, k, dg, 2) if need_offset else None,
                 table.new_empty(n * h_out, w_out, k, dg) if need_mask else None,
                 torch.zeros_like(w_mat) if need_weight else None)
    linear_t = _Linear(w_mat[0].t(), n * h_out * w_out) if g == 1 else None
    for r0, r1 in _chunks(n * h_out, w_out * k * c * table.element_size()):
        _backward_chunk(go[r0 * w_out:r1 * w_out], table, sampler, r0, r1, w_mat, linear_t, acc)

    grad_input = grad_offset = grad_mask = grad_weight = None
    if need_input:
        grad_input = acc.table[:, 1:-1, 1:-1].permute(0, 3, 1, 2) \
            .to(input.dtype).contiguous(memory_format=_memory_format(input))
    if need_offset:
        grad_offset = acc.offset.view(n, h_out, w_out, k, dg, 2).permute(0, 4, 3, 5, 1, 2) \
            .reshape(n, dg * k * 2, h_out, w_out).to(offset.dtype)
    if need_mask:
        grad_mask = acc.mask.view(n, h_out, w_out, k, dg).permute(0, 4, 3, 1, 2) \
            .reshape(n, dg * k, h_out, w_out).to(mask.dtype)
    if need_weight:
        grad_weight = acc.w_mat.view(c_out, k, cg).transpose(1, 2).reshape(c_out, cg, kh, kw) \
            .to(weight.dtype)
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias


def _backward_chunk(go: Tensor, table: Tensor, sampler: _Sampler, r0: int, r1: int, w_mat: Tensor,
                    linear_t: Optional[_Linear], acc: _Grads) -> None:
    """Accumulate the gradients from output rows [r0, r1), whose output gradient is ``go`` (P, C_out)."""
    n0, n1 = sampler.images(r0, r1)
    k, dg, g = sampler.k, sampler.dg, w_mat.shape[0]
    tab = table[n0:n1].view(-1, table.shape[-1] // dg)
    idx, wts, lh, lw = sampler(r0, r1, masked=False)
    m = sampler.mask_rows(r0, r1)
    psw = wts if m is None else wts * m[:, None]
    go_g = go.view(go.shape[0], g, -1).transpose(0, 1)  # (G, P, C_out/G)
    if acc.w_mat is not None:  # columns recomputed rather than kept from the forward, as mmcv
        cols = _embedding_bag(tab, idx, psw).view(go.shape[0], -1)
        if g == 1:
            acc.w_mat[0].addmm_(go.t(), cols)
        else:
            acc.w_mat.baddbmm_(go_g.transpose(1, 2), _grouped(cols, k, g))
        del cols  # before grad_cols, so a chunk holds one column buffer at a time
    if acc.table is None and acc.offset is None and acc.mask is None:
        return
    if linear_t is not None:
        grad_cols = linear_t(go)
    else:
        grad_cols = _ungrouped(torch.bmm(go_g, w_mat), k)
    grad_cols = grad_cols.view(idx.shape[0], -1)  # (B, C/DG): one row per sample
    offset2bag = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(4)
    if acc.table is not None:
        # The scatter-add transpose of the gather (sorts the indices, then one axpy per row), into a
        # fresh zeroed block; bag sizes and max indices only matter in mean / max mode. On CPU the
        # block spans only the table rows the chunk touches (a large image split into many chunks
        # would otherwise zero and add its whole table per chunk); the bounds are read on the host,
        # so not on GPUs (a sync) nor while compiling (a graph break).
        rows, lo, hi = idx.view(-1), 0, tab.shape[0]
        if idx.device.type == 'cpu' and rows.numel() and not torch.compiler.is_compiling():
            lo, hi = int(rows.min()), int(rows.max()) + 1
            rows = rows - lo
        bag_size = torch.full_like(idx[:, 0], 4)
        grad_tab = torch.ops.aten._embedding_bag_dense_backward(
            grad_cols, rows, offset2bag, bag_size, bag_size, hi - lo, False, 0, psw.view(-1), -1)
        acc.table[n0:n1].view(tab.shape)[lo:hi].add_(grad_tab)
        del grad_tab
    if acc.offset is not None or acc.mask is not None:
        # s[b, j] = <grad of sample b, corner row j of sample b>
        offsets = torch.arange(0, idx.numel(), 4, device=idx.device)
        s = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad_cols, tab, idx.view(-1), offsets, offset2bag, 0, -1).view(-1, 4)
        if acc.mask is not None:
            acc.mask[r0:r1] = (s * wts).sum(1).view(acc.mask[r0:r1].shape)
        if acc.offset is not None:
            if m is not None:
                s = s * m[:, None]
            s_tl, s_tr, s_bl, s_br = s.unbind(1)
            grad_h = (1 - lw) * (s_bl - s_tl) + lw * (s_br - s_tr)
            grad_w = (1 - lh) * (s_tr - s_tl) + lh * (s_br - s_bl)
            acc.offset[r0:r1] = torch.stack((grad_h, grad_w), -1).view(acc.offset[r0:r1].shape)


# ----------------------------------------------------------------------------------------------
# mmcv and torchvision backends


def _cast_for_kernels(input: Tensor, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """One dtype for the compiled kernels: they take half on CUDA only and no bfloat16 at all."""
    all_ = (input,) + tensors
    if input.is_cuda and all(t is None or t.dtype == torch.float16 for t in all_):
        dtype = torch.float16
    else:
        dtype = _compute_dtype(*all_)
    return tuple(None if t is None else t.to(dtype).contiguous() for t in all_)


def _mmcv_deform_conv2d(input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor,
                        bias: Optional[Tensor], geom: _Geometry) -> Tensor:
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
                               bias: Optional[Tensor], geom: _Geometry) -> Tensor:
    from torchvision.ops import deform_conv2d as tv_deform_conv2d

    x, off, m, w, b = _cast_for_kernels(input, offset, mask, weight, bias)
    with torch.autocast(input.device.type, enabled=False):
        out = tv_deform_conv2d(x, off, w, b, geom.stride, geom.padding, geom.dilation, m)
    return out.to(input.dtype)
