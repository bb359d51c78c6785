"""``deform_roi_pool``: deformable RoI pooling, DCNv1 and DCNv2 (modulated), with mmcv's semantics.

``deform_roi_pool`` computes what mmcv's ``deform_roi_pool`` kernel computes: RoIAlign with the
half-pixel shift (``x * spatial_scale - 0.5``, no minimum RoI size), each bin's start moved by
``gamma * roi_width * offset[:, 0]`` in x and ``gamma * roi_height * offset[:, 1]`` in y, and each
bin averaged over a ``grid_h x grid_w`` sampling grid (``sampling_ratio``, or per RoI
``ceil(roi_size / output_size)`` when it is 0). A sample outside ``[-1, H] x [-1, W]`` counts 0;
otherwise its coordinates are clamped to ``[0, H - 1] x [0, W - 1]`` and it is interpolated
bilinearly. With no offset it equals ``torchvision.ops.roi_align(..., aligned=True)``.

Backends (``backend=``):

- ``'native'``: the sparse-matrix kernel below (public torch functions, any device,
  float64 for gradcheck; exact gradients).
- ``'mmcv'``: mmcv's compiled kernel (CUDA only: mmcv 2.1 has no CPU kernel for this op).
- ``'torchvision'``: every bin of every RoI is a 1x1 ``torchvision.ops.roi_align(aligned=True)`` of
  its own "bin RoI" (the bin moved by its offset), which is the same computation, adaptive sampling
  included: RoIAlign's ``sampling_ratio=0`` gives a 1x1 bin of size ``roi_size / output_size``
  exactly ``ceil(roi_size / output_size)`` samples, mmcv's rule. It is what the ONNX export uses
  (RoIAlign is a standard ONNX op; deformable RoI pooling is not), and it agrees with native to
  float rounding (the bin RoI's corners are rounded once more; a bin size within rounding of an
  integer can get one sample more or less per axis). torchvision's RoIAlign does not differentiate
  its boxes, so the offsets get no gradient: for inference and export only.
- ``'auto'``: mmcv on CUDA when mmcv was compiled with CUDA, else native.

Every backend takes tensors of any strides, checked here before dispatch (one set of errors for all), and
returns the input gradient in the input's memory format; ``tests/ops/test_conformance.py`` runs all of them
through the same cases.

Dtypes, autocast and non-finite offsets or RoIs: :mod:`dcn_det.ops._common`.

The layers :class:`DeformRoIPool` and :class:`ModulatedDeformRoIPool` predict their own offsets (mmcv's
``DeformRoIPoolPack`` and ``ModulatedDeformRoIPoolPack``, with the same parameter names).

The native kernel: pooling is linear in the features, so each chunk of RoIs becomes one sparse matrix of bilinear
weights (rows: the chunk's ``K_c * ph * pw`` bins, columns: the ``N * H * W`` pixels) applied to the
channels-last features with ``torch.sparse.mm``; the transposed product gives the input gradient, and
one sampled dense-dense product (``torch.sparse.sampled_addmm``: grad_out . feature row, for each
stored entry) gives the offset gradient, because the bilinear weights are separable. Building the
matrix is vectorised per group of RoIs that share a sampling grid (adaptive sampling makes the grid
differ between RoIs); within a bin, the ``4 * grid_h * grid_w`` corner taps of an adaptive grid
collapse onto a window of at most ``(grid_h + 1) x (grid_w + 1)`` distinct pixels (2-3x fewer
entries). The matrix is built once per forward and kept for the backward; RoIs are processed in runs
of at most ``CHUNK_ENTRIES`` entries (or one RoI), so memory is bounded whatever K is. Public torch
functions only; any device.

Gradient convention: the exact derivative of the forward (so ``gradcheck`` passes). mmcv's backward
agrees everywhere except for samples in the one-pixel border strips where the forward clamps a
coordinate (``-1 <= y <= 0`` or ``H - 1 <= y <= H``, likewise x): there mmcv's offset gradient uses
the unclamped coordinate in its weights, so it is non-zero where the forward is flat and zero where
it is not. Forward values and the input gradient agree exactly.
"""
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._common import (
    BACKEND_CHOICES,
    IntPair,
    NonFiniteError,
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


def deform_roi_pool(input: Tensor,
                    rois: Tensor,
                    offset: Optional[Tensor] = None,
                    output_size: IntPair = 7,
                    spatial_scale: float = 1.0,
                    sampling_ratio: int = 0,
                    gamma: float = 0.1,
                    backend: str = 'auto') -> Tensor:
    """Deformable RoI pooling (DCNv1 section 2.2), exactly as mmcv's ``deform_roi_pool``.

    Args:
        input (Tensor[N, C, H, W]): feature map.
        rois (Tensor[K, 5]): (batch_index, x1, y1, x2, y2) in image coordinates; ``spatial_scale``
            maps them onto ``input``. Gets no gradient.
        offset (Tensor[K, 2, ph, pw], optional): per-bin normalised offsets; channel 0 moves the
            bin by ``gamma * roi_width * offset`` in x, channel 1 by ``gamma * roi_height * offset``
            in y. None means zero (plain aligned RoIAlign).
        output_size (int or (int, int)): (ph, pw).
        spatial_scale (float): feature size over image size, e.g. 0.25 for a stride-4 level.
        sampling_ratio (int): samples per bin along each axis; 0 means ``ceil(roi_size / output_size)``
            per RoI.
        gamma (float): offset scale.
        backend (str): ``'auto'``, ``'native'``, ``'mmcv'`` or ``'torchvision'`` (module docstring).

    Returns:
        Tensor[K, C, ph, pw] in ``input``'s dtype (float32 under autocast).

    Raises:
        NonFiniteError: ``rois`` or ``offset`` holds a NaN or an infinity.
    """
    ph, pw = check_args(input, rois, offset, output_size, spatial_scale, sampling_ratio)
    backend = resolve_backend(backend, input.device)
    input, offset = autocast_to_float32(input, offset)
    dtype = compute_dtype(input)
    x = input.to(dtype)
    boxes = rois.to(dtype)
    off = None if offset is None else offset.to(dtype)
    with torch.autocast(input.device.type, enabled=False):
        # their input gradient comes back NCHW: give it the input's layout, as the native kernel does
        if backend == 'mmcv':
            out = _mmcv_deform_roi_pool(grad_layout(x), boxes, off, (ph, pw), spatial_scale, sampling_ratio, gamma)
        elif backend == 'torchvision':
            out = _torchvision_deform_roi_pool(grad_layout(x), boxes, off, (ph, pw), spatial_scale, sampling_ratio,
                                               gamma)
        else:
            out = NativeDeformRoIPool.apply(x, boxes, off, Params(ph, pw, float(spatial_scale), sampling_ratio,
                                                                  float(gamma)))
    return out.to(input.dtype)


def resolve_backend(backend: str, device: torch.device) -> str:
    if check_backend(backend, BACKEND_CHOICES) == 'mmcv':
        if device.type != 'cuda' or not mmcv_has_cuda():
            raise ValueError(f"backend='mmcv' needs a CUDA tensor and mmcv compiled with CUDA (mmcv has "
                             f"no CPU kernel for deformable RoI pooling); input is on {device}: use "
                             f"backend='native' or 'auto'")
        return 'mmcv'
    if backend == 'auto':
        return 'mmcv' if device.type == 'cuda' and mmcv_has_cuda() else 'native'
    return backend


def check_args(input: Tensor, rois: Tensor, offset: Optional[Tensor], output_size: IntPair,
               spatial_scale: float, sampling_ratio: int) -> tuple[int, int]:
    """Every argument check of :func:`deform_roi_pool`; returns (ph, pw)."""
    check_tensor(input, 'input', 4)
    check_tensor(rois, 'rois', 2)
    check_tensor(offset, 'offset', 4, optional=True)
    check_devices(input, rois=rois, offset=offset)
    check_dtypes(input, offset=offset)
    if rois.dtype not in (input.dtype, torch.float32, torch.float64):
        raise TypeError(f'rois must be float32, float64 or the dtype of input ({input.dtype}), got {rois.dtype}')
    n, _, h, w = input.shape
    if rois.shape[1] != 5:
        raise ValueError(f'rois must have shape [K, 5] (batch_index, x1, y1, x2, y2), got {tuple(rois.shape)}')
    ph, pw = pair(output_size, 'output_size', 1)
    k = rois.shape[0]
    if offset is not None and offset.shape != (k, 2, ph, pw):
        raise ValueError(f'offset must have shape [K, 2, ph, pw] = {[k, 2, ph, pw]} (one (dx, dy) per RoI bin), '
                         f'got {list(offset.shape)}')
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int) or sampling_ratio < 0:
        raise ValueError(f'sampling_ratio must be an int >= 0 (0: adaptive), got {sampling_ratio!r}')
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, (int, float)) or not spatial_scale > 0:
        raise ValueError(f'spatial_scale must be a number > 0 (feature size / image size), got {spatial_scale!r}')
    check_finite(rois, 'rois')
    check_finite(offset, 'offset')
    if not torch.compiler.is_compiling() and k > 0:  # reads values (and sizes): not while compile / export traces
        if h == 0 or w == 0:
            raise ValueError(f'input has an empty spatial size ({h}, {w}) but there are {k} RoIs')
        index = rois[:, 0].detach()
        if not bool(((index >= 0) & (index < n) & (index == index.floor())).all()):
            raise ValueError(f'rois[:, 0] must be integer batch indices in [0, {n - 1}] for an input of batch '
                             f'size {n}, got values in [{index.min().item():g}, {index.max().item():g}]')
    return ph, pw


def _mmcv_deform_roi_pool(input: Tensor, rois: Tensor, offset: Optional[Tensor], output_size: tuple[int, int],
                          spatial_scale: float, sampling_ratio: int, gamma: float) -> Tensor:
    from mmcv.ops import deform_roi_pool as mmcv_deform_roi_pool

    out = mmcv_deform_roi_pool(input.contiguous(), rois.contiguous(),
                               None if offset is None else offset.contiguous(), output_size,
                               spatial_scale, sampling_ratio, gamma)
    # mmcv's backward reads grad_output through a raw pointer: it must be contiguous
    return grad_layout(out, torch.contiguous_format)


def _torchvision_deform_roi_pool(input: Tensor, rois: Tensor, offset: Optional[Tensor],
                                 output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int,
                                 gamma: float) -> Tensor:
    from torchvision.ops import roi_align

    if sampling_ratio == 0:  # x2 < x1: mmcv's adaptive grid has no samples (output 0); so has a 0-wide RoI
        rois = torch.cat([rois[:, :3], torch.maximum(rois[:, 3:], rois[:, 1:3])], 1)
    if offset is None:
        return roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned=True)
    if offset.requires_grad and torch.is_grad_enabled():
        raise ValueError("backend='torchvision' gives the offsets no gradient (torchvision's roi_align does not "
                         "differentiate its boxes): use it for inference and export, and 'native' or 'auto' to "
                         'train')
    ph, pw = output_size
    k = rois.shape[0]
    x1, y1, x2, y2 = (rois[:, 1:] * spatial_scale - 0.5).unbind(1)
    roi_w, roi_h = (x2 - x1).view(k, 1, 1), (y2 - y1).view(k, 1, 1)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    # each bin's start in feature pixels, in the kernel's order: (roi start + offset) + bin index * bin size
    cols = torch.arange(pw, dtype=rois.dtype, device=rois.device).view(1, 1, pw)
    rows = torch.arange(ph, dtype=rois.dtype, device=rois.device).view(1, ph, 1)
    start_x = (x1.view(k, 1, 1) + gamma * roi_w * offset[:, 0]) + cols * bin_w
    start_y = (y1.view(k, 1, 1) + gamma * roi_h * offset[:, 1]) + rows * bin_h
    # back to image coordinates, where roi_align(aligned=True) applies x * spatial_scale - 0.5
    bin_rois = torch.stack([rois[:, :1].view(k, 1, 1).expand(k, ph, pw),
                            (start_x + 0.5) / spatial_scale, (start_y + 0.5) / spatial_scale,
                            (start_x + bin_w + 0.5) / spatial_scale, (start_y + bin_h + 0.5) / spatial_scale], -1)
    out = roi_align(input, bin_rois.view(-1, 5), 1, spatial_scale, sampling_ratio, aligned=True)
    return out.view(k, ph, pw, input.shape[1]).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------
# The layers


class RoIOffsetPredictor(nn.Module):
    """The offset (and mask) predictor of deformable RoI pooling: mmcv's ``offset_fc`` and ``mask_fc``.

    ``offset_fc``: Linear(C·ph·pw, F), ReLU, Linear(F, F), ReLU, Linear(F, 2·ph·pw); ``mask_fc``
    (modulated only): Linear(C·ph·pw, F), ReLU, Linear(F, ph·pw), Sigmoid. The last Linear of each
    starts at zero (offset 0, mask 0.5). A pooling layer normally holds its own (mmcv's layout: the
    stacks are the layer's ``offset_fc`` / ``mask_fc``); layers built with ``own_predictor=False``
    share one that their owner holds and passes to each call (``layer(input, rois, predictor)``).

    Args:
        output_size (int or (int, int)): (ph, pw) of the pooling it serves.
        output_channels (int): C, the channels of the pooled features.
        deform_fc_channels (int): F, the hidden width.
        modulated (bool): add ``mask_fc`` (DCNv2).

    Shapes: ``forward(flat)`` with ``flat (Tensor[K, C * ph * pw])`` (the plain pool, flattened) ->
    ``offset (Tensor[K, 2, ph, pw])``, ``mask (Tensor[K, 1, ph, pw])`` or None.
    """

    def __init__(self, output_size: IntPair, output_channels: int, deform_fc_channels: int = 1024,
                 modulated: bool = False) -> None:
        super().__init__()
        self.output_size = pair(output_size, 'output_size', 1)
        for name, stack in _fc_stacks(self.output_size, output_channels, deform_fc_channels, modulated).items():
            self.add_module(name, stack)

    def forward(self, flat: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        return _predict(self, flat, self.output_size)


def _fc_stacks(output_size: tuple[int, int], channels: int, hidden: int, modulated: bool) -> dict[str, nn.Sequential]:
    bins = output_size[0] * output_size[1]
    stacks = {'offset_fc': nn.Sequential(
        nn.Linear(bins * channels, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, bins * 2))}
    if modulated:
        stacks['mask_fc'] = nn.Sequential(
            nn.Linear(bins * channels, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, bins), nn.Sigmoid())
    for stack in stacks.values():
        last = [m for m in stack if isinstance(m, nn.Linear)][-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return stacks


def _predict(fcs: nn.Module, flat: Tensor, output_size: tuple[int, int]) -> tuple[Tensor, Optional[Tensor]]:
    """Offset and mask from the ``offset_fc`` / ``mask_fc`` of ``fcs`` (a predictor or a pooling layer)."""
    offset = fcs.offset_fc(flat).view(-1, 2, *output_size)
    mask_fc = getattr(fcs, 'mask_fc', None)
    return offset, None if mask_fc is None else mask_fc(flat).view(-1, 1, *output_size)


class DeformRoIPool(nn.Module):
    """DCNv1 deformable RoI pooling with its offset predictor (mmcv's ``DeformRoIPoolPack``).

    Plain aligned RoIAlign, ``offset_fc`` on the flattened result, then :func:`deform_roi_pool` with
    those offsets. The last fc layer starts at zero, so a fresh module equals
    ``torchvision.ops.roi_align(..., aligned=True)``. Parameter names match mmcv's pack, so its state
    dicts load strictly. Layers that share one predictor (e.g. across FPN levels) are built with
    ``own_predictor=False`` and called as ``layer(input, rois, predictor)`` with a
    :class:`RoIOffsetPredictor` their owner holds.

    Args:
        output_size (int or (int, int)): (ph, pw).
        output_channels (int): C, the channels of ``input``.
        deform_fc_channels (int): hidden width of the fc predictor.
        spatial_scale, sampling_ratio, gamma, backend: as in :func:`deform_roi_pool`.
        own_predictor (bool): hold ``offset_fc`` (and ``mask_fc``) here (mmcv's layout); False: no
            parameters here, every call passes the predictor.
    """

    layer_name: Optional[str] = None  # set by the model that holds the layer, for error messages
    modulated = False

    def __init__(self,
                 output_size: IntPair,
                 output_channels: int,
                 deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0,
                 sampling_ratio: int = 0,
                 gamma: float = 0.1,
                 backend: str = 'auto',
                 own_predictor: bool = True) -> None:
        super().__init__()
        self.output_size = pair(output_size, 'output_size', 1)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)
        self.backend = check_backend(backend, BACKEND_CHOICES)
        self.own_predictor = own_predictor
        if own_predictor:
            for name, stack in _fc_stacks(self.output_size, output_channels, deform_fc_channels,
                                          self.modulated).items():
                self.add_module(name, stack)

    def forward(self, input: Tensor, rois: Tensor, predictor: Optional[nn.Module] = None) -> Tensor:
        """input (Tensor[N, C, H, W]), rois (Tensor[K, 5]) -> Tensor[K, C, ph, pw].

        ``predictor``: a :class:`RoIOffsetPredictor` (or any module with this layer's ``offset_fc`` /
        ``mask_fc``) to use instead of the layer's own; required when built with ``own_predictor=False``.
        """
        fcs = self._fcs(predictor)
        flat = self._pool(input, rois).flatten(1)
        offset, mask = _predict(fcs, flat, self.output_size)
        # under autocast the fc runs in low precision whatever the features' dtype
        out = self._pool(input, rois, offset.to(input.dtype))
        return out if mask is None else out * mask

    def _fcs(self, predictor: Optional[nn.Module]) -> nn.Module:
        if predictor is None:
            if not self.own_predictor:
                raise ValueError(f'{self.layer_name or type(self).__name__} was built with own_predictor=False: '
                                 'pass the shared predictor, layer(input, rois, predictor)')
            return self
        if hasattr(predictor, 'mask_fc') != self.modulated:
            raise ValueError(f'{type(self).__name__} needs a predictor '
                             f'{"with" if self.modulated else "without"} mask_fc, got {type(predictor).__name__} '
                             f'{"without" if self.modulated else "with"} one')
        return predictor

    def _pool(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        if input.dim() == 4 and input.shape[1] != self.output_channels:
            raise ValueError(f'input has {input.shape[1]} channels but this module was built with '
                             f'output_channels={self.output_channels}')
        try:
            return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale,
                                   self.sampling_ratio, self.gamma, self.backend)
        except NonFiniteError as e:
            raise NonFiniteError(f'{self.layer_name or type(self).__name__}: {e}') from None

    def extra_repr(self) -> str:
        return (f'output_size={self.output_size}, output_channels={self.output_channels}, '
                f'spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, '
                f'gamma={self.gamma}, backend={self.backend!r}'
                + ('' if self.own_predictor else ', own_predictor=False'))


class ModulatedDeformRoIPool(DeformRoIPool):
    """DCNv2 modulated deformable RoI pooling (mmcv's ``ModulatedDeformRoIPoolPack``).

    As :class:`DeformRoIPool`, and the pooled result is multiplied per bin by
    ``mask_fc(plain pool)`` (Linear, ReLU, Linear, Sigmoid; last Linear zero-initialised, so a
    fresh module returns 0.5 x aligned RoIAlign). Same arguments as :class:`DeformRoIPool`.
    """

    modulated = True


# ------------------------------------------------------------------------------------------------
# The native kernel


# Entries of one chunk's weight matrix (~50 bytes each while it is built, 20 kept for the backward:
# 2**21 holds ~1700 RoIs of 112 px on a stride-4 level); tests lower it to force chunking.
CHUNK_ENTRIES = 2**21


class Params(NamedTuple):
    ph: int
    pw: int
    spatial_scale: float
    sampling_ratio: int
    gamma: float


class _Axis(NamedTuple):
    """1D bilinear profile along one axis of each bin of a group of RoIs: Tensor[Kg, ph, pw, L] each."""
    index: Tensor  # pixel row (or column)
    weight: Tensor  # summed bilinear weight of the bin's samples at that pixel
    slope: Tensor  # its derivative w.r.t. the bin's offset


class _Group(NamedTuple):
    """RoIs of a chunk sharing a sampling grid; their matrix entries are the outer products y (x) x."""
    ids: Tensor  # Tensor[Kg], RoI indices
    y: _Axis  # weights include 1 / count, slopes gamma * roi_height / count
    x: _Axis  # slopes include gamma * roi_width
    entries: slice  # where the group's outer products lie in the chunk's grouped entry order


class _Chunk(NamedTuple):
    rois: slice  # a run of RoIs; the matrix has their ph * pw bins as rows, in order
    matrix: Tensor  # sparse CSR [rows, N * H * W]
    groups: list[_Group]
    order: Tensor  # CSR position of each entry in grouped order (the groups' outer products, concatenated)


class NativeDeformRoIPool(torch.autograd.Function):
    """apply(input, rois, offset, Params) -> Tensor[K, C, ph, pw]; arguments checked by the caller."""

    @staticmethod
    def forward(ctx, input: Tensor, rois: Tensor, offset: Optional[Tensor], p: Params) -> Tensor:
        n, c, h, w = input.shape
        k = rois.shape[0]
        table = _pixel_rows(input)
        chunks = _plan(rois, offset, p, n, h, w)
        rows = [torch.sparse.mm(chunk.matrix, table) for chunk in chunks]
        if len(rows) == 1:
            out = rows[0]
        else:
            out = torch.cat(rows) if rows else input.new_empty(0, c)
        ctx.chunks, ctx.input_shape, ctx.memory_format = chunks, input.shape, memory_format(input)
        # the offset gradient reads the features; the input gradient needs only the matrices
        ctx.save_for_backward(table if ctx.needs_input_grad[2] else None)
        return out.view(k, p.ph, p.pw, c).permute(0, 3, 1, 2).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Optional[Tensor], None, Optional[Tensor], None]:
        (table,) = ctx.saved_tensors
        need_input, _, need_offset, _ = ctx.needs_input_grad
        n, c, h, w = ctx.input_shape
        bins = grad_out.shape[2] * grad_out.shape[3]
        grad_rows = grad_out.permute(0, 2, 3, 1).reshape(-1, c)
        grad_input = None
        if need_input:
            grad_input = torch.empty(ctx.input_shape, dtype=grad_out.dtype, device=grad_out.device,
                                     memory_format=ctx.memory_format)
        grad_offset = grad_out.new_zeros(grad_out.shape[0], 2, *grad_out.shape[2:]) if need_offset else None
        if need_input and not ctx.chunks:
            grad_input.zero_()
        for i, chunk in enumerate(ctx.chunks):
            g = grad_rows[chunk.rois.start * bins:chunk.rois.stop * bins]
            if need_input:
                # one image at a time, so that only an image's [H * W, C] block is ever transposed
                transposed = chunk.matrix.t().to_sparse_csr()
                for b in range(n):
                    part = torch.sparse.mm(_csr_rows(transposed, b * h * w, (b + 1) * h * w), g).t()
                    dst = grad_input[b].view(c, h * w)
                    if i == 0:
                        dst.copy_(part)
                    else:
                        dst.add_(part)
            if need_offset:
                # d out[r] / d offset = sum_e slope[e] * table[col[e]], dotted with grad_out[r]:
                # sum_e slope[e] * (g[r] . table[col[e]]), one sampled dense-dense product for all e
                dots = torch.sparse.sampled_addmm(chunk.matrix, g, table.t(), beta=0.0).values()
                dots = dots[chunk.order]
                for group in chunk.groups:
                    grad_offset[group.ids] = _offset_grad(group, dots[group.entries])
        return grad_input, None, grad_offset, None


def _pixel_rows(input: Tensor) -> Tensor:
    """Tensor[N * H * W, C], channels-last; copied an image at a time (a 2D transpose is fast)."""
    n, c, h, w = input.shape
    if input.is_contiguous(memory_format=torch.channels_last):
        return input.permute(0, 2, 3, 1).reshape(n * h * w, c)
    table = input.new_empty(n, h * w, c)
    for b in range(n):
        table[b].copy_(input[b].reshape(c, h * w).t())
    return table.view(n * h * w, c)


def _csr_rows(matrix: Tensor, start: int, stop: int) -> Tensor:
    """Rows [start, stop) of a CSR matrix, sharing its column and value storage."""
    crow = matrix.crow_indices()[start:stop + 1]
    first, last = int(crow[0]), int(crow[-1])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # "Sparse CSR tensor support is in beta state"
        return torch.sparse_csr_tensor(crow - first, matrix.col_indices()[first:last],
                                       matrix.values()[first:last], (stop - start, matrix.shape[1]))


def _offset_grad(group: _Group, dots: Tensor) -> Tensor:
    """Tensor[Kg, 2, ph, pw]: the separable sum over each bin's entries of slope * dot."""
    wy, sy, wx, sx = group.y.weight, group.y.slope, group.x.weight, group.x.slope
    d = dots.view(*wy.shape, wx.shape[-1])
    gx = ((d @ sx.unsqueeze(-1)).squeeze(-1) * wy).sum(-1)
    gy = ((d @ wx.unsqueeze(-1)).squeeze(-1) * sy).sum(-1)
    return torch.stack([gx, gy], 1)


def _grid(size: Tensor, bins: int, sampling_ratio: int) -> Tensor:
    if sampling_ratio > 0:
        return torch.full_like(size, sampling_ratio, dtype=torch.long)
    # mmcv's static_cast<int>(ceilf(roi_size / bins)): ceilf rounds to float32 first, even for double
    return torch.ceil((size / bins).float()).long().clamp_min(0)


def _plan(rois: Tensor, offset: Optional[Tensor], p: Params, n: int, h: int, w: int) -> list[_Chunk]:
    """Cut the RoIs into runs of bounded matrix size and build each run's CSR matrix."""
    k = rois.shape[0]
    if k == 0:
        return []
    x1, y1, x2, y2 = (rois[:, 1:] * p.spatial_scale - 0.5).unbind(1)
    rw, rh = x2 - x1, y2 - y1
    grid_h, grid_w = _grid(rh, p.ph, p.sampling_ratio), _grid(rw, p.pw, p.sampling_ratio)
    start_x, start_y = x1.view(k, 1, 1), y1.view(k, 1, 1)
    if offset is not None:
        start_x = start_x + (p.gamma * rw).view(k, 1, 1) * offset[:, 0]
        start_y = start_y + (p.gamma * rh).view(k, 1, 1) * offset[:, 1]
    geometry = dict(
        batch=rois[:, 0].long(), bin_h=rh / p.ph, bin_w=rw / p.pw, grid_h=grid_h, grid_w=grid_w,
        start_y=start_y.expand(k, p.ph, p.pw), start_x=start_x.expand(k, p.ph, p.pw),
        count=(grid_h * grid_w).clamp_min(1).to(rois.dtype), slope_y=p.gamma * rh, slope_x=p.gamma * rw)
    # entries per RoI are at most bins * (g + 1)^2 with an adaptive grid (see _axis), else bins * 4 g^2
    if p.sampling_ratio > 0:
        bound = 4 * grid_h * grid_w
    else:
        bound = (grid_h + 1) * (grid_w + 1) * (grid_h * grid_w > 0)
    entries_before = torch.cumsum(bound * (p.ph * p.pw), 0) - bound * (p.ph * p.pw)
    chunk_of = torch.div(entries_before, CHUNK_ENTRIES, rounding_mode='floor')
    sizes = torch.unique_consecutive(chunk_of, return_counts=True)[1].tolist()
    chunks, start = [], 0
    for size in sizes:
        chunks.append(_chunk(slice(start, start + size), geometry, p, n, h, w))
        start += size
    return chunks


def _chunk(run: slice, geometry: dict[str, Tensor], p: Params, n: int, h: int, w: int) -> _Chunk:
    """CSR matrix of a run of RoIs, built per group of RoIs sharing a sampling grid."""
    g = {name: t[run] for name, t in geometry.items()}
    grid_h, grid_w = g['grid_h'], g['grid_w']
    device, dtype = grid_h.device, g['bin_h'].dtype
    bins = p.ph * p.pw
    pos = torch.arange(max(p.ph, p.pw), dtype=dtype, device=device)
    # 1D profiles: one vectorised pass per distinct grid size and axis
    y_slot, ys = _profiles(grid_h, g['start_y'], g['bin_h'], pos[:p.ph].view(1, p.ph, 1), h)
    x_slot, xs = _profiles(grid_w, g['start_x'], g['bin_w'], pos[:p.pw].view(1, 1, p.pw), w)
    key = grid_h * (int(grid_w.max()) + 1) + grid_w
    order = torch.argsort(key, stable=True)
    sizes = torch.unique_consecutive(key[order], return_counts=True)[1].tolist()
    groups, cols, vals = [], [], []
    per_roi = torch.zeros_like(grid_h)  # matrix entries per bin of each RoI
    first = 0
    for ids in order.split(sizes):
        gh, gw = int(grid_h[ids[0]]), int(grid_w[ids[0]])
        if gh == 0 or gw == 0:  # degenerate RoI, no samples: mmcv outputs 0 (and no gradient)
            continue
        y = _Axis(*(t[y_slot[ids]] for t in ys[gh]))
        x = _Axis(*(t[x_slot[ids]] for t in xs[gw]))
        count = g['count'][ids].view(-1, 1, 1, 1)
        y = y._replace(weight=y.weight / count, slope=y.slope * g['slope_y'][ids].view(-1, 1, 1, 1) / count)
        x = x._replace(slope=x.slope * g['slope_x'][ids].view(-1, 1, 1, 1))
        pixel = (g['batch'][ids] * (h * w)).view(-1, 1, 1, 1, 1) + (y.index * w).unsqueeze(-1)
        cols.append((pixel + x.index.unsqueeze(-2)).flatten())
        vals.append((y.weight.unsqueeze(-1) * x.weight.unsqueeze(-2)).flatten())
        per_roi[ids] = y.index.shape[-1] * x.index.shape[-1]
        groups.append(_Group(ids + run.start, y, x, slice(first, first + cols[-1].numel())))
        first += cols[-1].numel()
    # CSR rows in RoI order: the grouped entries go to their rows' slots
    per_row = per_roi.repeat_interleave(bins)
    crow = torch.cat([per_row.new_zeros(1), torch.cumsum(per_row, 0)])
    grouped_rows = (order.view(-1, 1) * bins + torch.arange(bins, device=device)).flatten()
    grouped_rows = grouped_rows[per_row[grouped_rows] > 0]
    sizes = per_row[grouped_rows]
    starts = torch.cumsum(sizes, 0) - sizes
    positions = (torch.arange(first, device=device)
                 + (crow[grouped_rows] - starts).repeat_interleave(sizes, output_size=first))
    col = torch.empty(first, dtype=torch.long, device=device)
    val = torch.empty(first, dtype=dtype, device=device)
    if groups:
        col[positions], val[positions] = torch.cat(cols), torch.cat(vals)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state", once per process
        warnings.simplefilter('ignore', UserWarning)
        matrix = torch.sparse_csr_tensor(crow, col, val, (per_row.numel(), n * h * w))
    return _Chunk(run, matrix, groups, positions)


def _profiles(grid: Tensor, start: Tensor, bin_size: Tensor, pos: Tensor,
              length: int) -> tuple[Tensor, dict[int, _Axis]]:
    """Profiles along one axis of all RoIs, computed per grid size: (slot, {grid size: profiles}),
    where slot[k] is RoI k's index into the profiles of its grid size."""
    slot = torch.empty_like(grid)
    profiles = {}
    for size in torch.unique(grid).tolist():
        if size == 0:
            continue
        ids = (grid == size).nonzero().squeeze(1)
        slot[ids] = torch.arange(ids.numel(), device=grid.device)
        profiles[size] = _axis(start[ids], bin_size[ids], pos, size, length)
    return slot, profiles


def _axis(start: Tensor, bin_size: Tensor, pos: Tensor, grid: int, length: int) -> _Axis:
    """Bilinear profile along one axis of each bin of Kg RoIs, by mmcv's ``bilinear_interpolate``.

    start (Tensor[Kg, ph, pw]): RoI start plus offset; bin_size (Tensor[Kg]); pos: the bins' index
    along this axis, broadcastable to start; grid: samples per bin along this axis; length: H or W.
    """
    bs = bin_size.view(-1, 1, 1)
    ticks = torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5
    # the kernel's operation order: (start + bin * bin_size) + (i + .5) * bin_size / grid
    coord = (start + pos * bs).unsqueeze(-1) + ticks * bs.unsqueeze(-1) / grid
    inside = ((coord >= -1) & (coord <= length)).to(coord.dtype)
    clamped = coord.clamp(0, length - 1)
    low = clamped.floor()
    frac = clamped - low
    low = low.long()
    high = (low + 1).clamp_max(length - 1)  # where this clamps, frac is 0: high carries no weight
    moving = ((coord > 0) & (coord < length - 1)).to(coord.dtype)  # not clamped (so also inside)
    w_low, w_high = (1 - frac) * inside, frac * inside
    # With an adaptive grid the samples are <= 1 px apart, so their corners form a run of at most
    # grid + 1 pixels: sum them onto that window rather than keeping 2 * grid corners.
    base = low.amin(-1, keepdim=True)
    span = int((high.amax(-1, keepdim=True) - base).max()) + 1
    if span >= 2 * grid:
        return _Axis(torch.cat([low, high], -1), torch.cat([w_low, w_high], -1),
                     torch.cat([-moving, moving], -1))
    base = base.clamp_max(length - span).clamp_min(0)
    index = (base + torch.arange(span, device=start.device)).clamp_max(length - 1)
    zeros = coord.new_zeros(*coord.shape[:-1], span)
    lo, hi = low - base, high - base
    weight = zeros.scatter_add(-1, lo, w_low).scatter_add_(-1, hi, w_high)
    slope = zeros.scatter_add(-1, lo, -moving).scatter_add_(-1, hi, moving)
    return _Axis(index, weight, slope)
