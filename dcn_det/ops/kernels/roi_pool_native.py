"""Deformable RoI pooling's native kernel: one sparse matrix of bilinear weights per chunk of RoIs.

Pooling is linear in the features, so each chunk of RoIs becomes one sparse matrix of bilinear
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
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._common import memory_format

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
