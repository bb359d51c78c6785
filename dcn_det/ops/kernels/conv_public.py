"""Deformable convolution on public torch functions only: the fallback of the compiled CPU kernel, and
the kernel on every other device.

The input becomes a zero-padded channels-last table of pixel rows; every bilinear sample is then a
bag of four weighted rows, gathered by :func:`torch.nn.functional.embedding_bag` with the mask
folded into the per-sample weights, and the convolution is one ``(P, K*C) @ (K*C, C_out)`` matmul
over those columns. In the backward the gather is a sparse matrix (samples x table rows, four
bilinear weights a row): its transpose times the column gradient is the input gradient, and one
sampled dense-dense product (the column gradient dotted with each sample's corner rows) gives the
offset and mask gradients in closed form. Work is chunked over output rows so that a column buffer
stays under ``chunk_bytes`` whatever the image size, and the columns are recomputed in the backward
rather than kept, as mmcv does.

Layout: the table has one row per (image, padded pixel, offset group), holding that group's C/DG
channels: (N, H+2, W+2, C) zero-padded by one pixel, viewed as (N*(H+2)*(W+2)*DG, C/DG). A sample
inside the open box -1 < h < H, -1 < w < W reads the 2x2 patch whose top-left corner is (floor(h),
floor(w)); with the padding every such corner row exists and corners outside the image read zeros.
A sample outside is parked at (-1, -1): its only weighted corner is then a padding row, so it and
its gradients are 0, as in mmcv. Arguments: float32 or float64, one dtype, checked by the caller;
``geom`` is :class:`dcn_det.ops.kernels.conv_native.Geometry`.
"""
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


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
    return weight.view(groups, c_out // groups, cg, kh * kw).transpose(2, 3).reshape(groups, c_out // groups,
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


def forward(input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
            geom, chunk_bytes: int) -> Tensor:
    """Tensor[N, C_out, H_out, W_out] (a channels-last view)."""
    n, c, _, _ = input.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = geom.out_size
    g = geom.groups
    table = _table(input)
    sampler = _Sampler(input.shape, (kh, kw), geom, offset, mask)
    w_mat = _weight_matrix(weight, g)
    out = input.new_empty(n * h_out * w_out, c_out)
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
    return out.view(n, h_out, w_out, c_out).permute(0, 3, 1, 2)


class _Grads(NamedTuple):
    """Gradient accumulators of the backward (None where not needed)."""
    table: Optional[Tensor]   # (N, H+2, W+2, C)
    offset: Optional[Tensor]  # (N*H_out, W_out, K, DG, 2)
    mask: Optional[Tensor]    # (N*H_out, W_out, K, DG)
    w_mat: Optional[Tensor]   # (G, C_out/G, K*C/G)


def backward(grad_out: Tensor, input: Tensor, offset: Tensor, mask: Optional[Tensor], weight: Tensor, geom,
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
