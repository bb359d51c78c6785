"""Slow, obviously correct float64 references of the two ops (mmcv's kernel rules, as loops), and the
inputs the op tests share. Needs torch only, so the CUDA tests run where mmcv is not installed."""
import collections
import math

import torch
import torch.nn as nn

# ------------------------------------------------------------------------------------------------
# slow, obviously correct reference (mmcv semantics), float64, differentiable with corners held fixed


def _bilinear_conv(img, h, w):
    """Sample img (C, H, W) at (h, w) as mmcv's dmcn_im2col_bilinear, zero outside -1 < h < H etc."""
    height, width = img.shape[1:]
    hf, wf = float(h.detach()), float(w.detach())
    if not (-1 < hf < height and -1 < wf < width):
        return img.new_zeros(img.shape[0])
    y0, x0 = math.floor(hf), math.floor(wf)
    ly, lx = h - y0, w - x0
    val = img.new_zeros(img.shape[0])
    for y, x, wt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                     (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        if 0 <= y < height and 0 <= x < width:
            val = val + wt * img[:, y, x]
    return val


def conv_reference(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Deformable conv by explicit loops over every sample, as mmcv's im2col + matmul."""
    n, c, _, _ = input.shape
    c_out, cg, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = (nn.modules.utils._pair(v) for v in (stride, padding, dilation))
    groups, k = c // cg, kh * kw
    dg = offset.shape[1] // (2 * k)
    cd = c // dg
    h_out, w_out = offset.shape[2:]

    def sample(b, g, kk, y, x):  # (cd,) values of offset group g, kernel point kk, output (y, x)
        i, j = divmod(kk, kw)
        h = y * sh - ph + i * dh + offset[b, 2 * (g * k + kk), y, x]
        w = x * sw - pw + j * dw + offset[b, 2 * (g * k + kk) + 1, y, x]
        v = _bilinear_conv(input[b, g * cd:(g + 1) * cd], h, w)
        return v if mask is None else v * mask[b, g * k + kk, y, x]

    if n == 0:
        return input.new_zeros(0, c_out, h_out, w_out)
    cols = torch.stack([  # (N, C, K, H_out, W_out)
        torch.cat([
            torch.stack([
                torch.stack([torch.stack([sample(b, g, kk, y, x) for x in range(w_out)], -1)
                             for y in range(h_out)], -2)
                for kk in range(k)], 1)
            for g in range(dg)], 0)
        for b in range(n)])
    og = c_out // groups
    out = torch.cat([torch.einsum('ock,nckyx->noyx', weight[gi * og:(gi + 1) * og].reshape(og, cg, k),
                                  cols[:, gi * cg:(gi + 1) * cg]) for gi in range(groups)], 1)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def make_inputs(n=2, c=4, h=6, w=5, c_out=3, kernel=(3, 3), groups=1, offset_groups=1, stride=1,
                padding=1, dilation=1, modulated=True, scale=2.5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kh, kw = kernel
    (sh, sw), (ph, pw), (dh, dw) = (nn.modules.utils._pair(v) for v in (stride, padding, dilation))
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    offset = torch.randn(n, 2 * offset_groups * kh * kw, h_out, w_out, generator=gen, dtype=dtype) * scale
    mask = torch.rand(n, offset_groups * kh * kw, h_out, w_out, generator=gen, dtype=dtype) \
        if modulated else None
    weight = torch.randn(c_out, c // groups, kh, kw, generator=gen, dtype=dtype)
    bias = torch.randn(c_out, generator=gen, dtype=dtype)
    return dict(input=x, offset=offset, weight=weight, bias=bias, stride=stride, padding=padding,
                dilation=dilation, mask=mask)


# make_inputs variants that the conv tests share: every feature of the op, offsets of scale 2.5 that put
# many samples outside the image and across its borders
CONFIGS = {
    'v2': dict(),
    'v1': dict(modulated=False),
    'groups2_offset_groups2': dict(c=4, c_out=4, groups=2, offset_groups=2),
    'offset_groups4_one_channel_each': dict(c=4, offset_groups=4),
    'stride2_dilation2_kernel3x2': dict(h=7, w=8, kernel=(3, 2), stride=2, padding=2, dilation=2),
    'tuple_args_no_padding': dict(h=6, w=7, stride=(1, 2), padding=(0, 1), dilation=(2, 1)),
    # TOOD's feature sampling: a depthwise 1x1 kernel with one offset group per channel, on a tiny map
    'depthwise_1x1_offset_group_per_channel': dict(c=4, c_out=4, h=1, w=2, kernel=(1, 1), groups=4, offset_groups=4,
                                                   padding=0, modulated=False),
}

TENSORS = ('input', 'offset', 'mask', 'weight', 'bias')


def forward_backward(fn, args, grad_seed=1):
    """Run fn on leaf views of args (same storage and strides); return the output and the gradients."""
    args = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v)  # keeps strides
            for k, v in args.items()}
    out = fn(**args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
    out.backward(grad.to(out.device))
    return out.detach(), {k: args[k].grad for k in TENSORS if args.get(k) is not None}


# ----------------------------------------------------------------------------------------------
# slow reference: mmcv's deform_roi_pool_forward_cuda_kernel and bilinear_interpolate, as loops


def _bilinear_roi(feat, y, x, stats):
    """mmcv's bilinear_interpolate at (y, x) of feat [C, H, W]; stats counts the edge cases hit: off
    the map, and in the strips [-1, 0] and [H - 1, H] (or W) where a coordinate is clamped."""
    h, w = feat.shape[1:]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        stats['outside'] += 1
        return feat.new_zeros(feat.shape[0])
    stats['low strip'] += y <= 0 or x <= 0
    stats['high strip'] += y >= h - 1 or x >= w - 1
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_high = y_low = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_high = x_low = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (hy * hx * feat[:, y_low, x_low] + hy * lx * feat[:, y_low, x_high]
            + ly * hx * feat[:, y_high, x_low] + ly * lx * feat[:, y_high, x_high])


EDGES = ('outside', 'low strip', 'high strip')


def roi_reference(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, stats=None):
    stats = collections.Counter() if stats is None else stats
    ph, pw = output_size
    input = input.double()
    out = input.new_zeros(rois.shape[0], input.shape[1], ph, pw)
    for k, (b, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        x1, y1 = x1 * spatial_scale - 0.5, y1 * spatial_scale - 0.5
        x2, y2 = x2 * spatial_scale - 0.5, y2 * spatial_scale - 0.5
        rw, rh = x2 - x1, y2 - y1
        bw, bh = rw / pw, rh / ph
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw)
        count = max(gh * gw, 1)
        for i in range(ph):
            for j in range(pw):
                sx, sy = x1, y1
                if offset is not None:
                    sx += gamma * rw * float(offset[k, 0, i, j])
                    sy += gamma * rh * float(offset[k, 1, i, j])
                for iy in range(gh):
                    y = sy + i * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        x = sx + j * bw + (ix + 0.5) * bw / gw
                        out[k, :, i, j] += _bilinear_roi(input[int(b)], y, x, stats)
                out[k, :, i, j] /= count
    return out


def torchvision_safe(rois):
    """Drop RoIs with x2 < x1: torchvision's CPU roi_align sizes a buffer by the (then negative)
    adaptive grid and fails with 'cannot create std::vector larger than max_size()'."""
    return rois[rois[:, 3] >= rois[:, 1]]


def random_case(seed, n=3, c=3, h=9, w=11, k=7, output_size=(3, 2), spatial_scale=0.25,
                dtype=torch.float64, offset_scale=3.0):
    """RoIs in image coordinates of a (4h x 4w) image, some partly outside it, one much larger than
    the map, one at the top-left corner, one with x2 < x1, none on image 1; offsets that push samples
    off the map."""
    g = torch.Generator().manual_seed(seed)
    img_h, img_w = h / spatial_scale, w / spatial_scale
    xy1 = torch.rand(k, 2, generator=g) * torch.tensor([img_w, img_h]) * 1.1 - 4
    wh = torch.rand(k, 2, generator=g) * torch.tensor([img_w, img_h]) * 0.7 + 2
    wh[0] = torch.tensor([img_w, img_h]) * 2.5
    xy1[1], wh[1] = -2.0, 6.0  # starts at -1 on the map: samples in the clamped strip [-1, 0]
    batch = torch.tensor([0, 2] * k)[:k, None].to(dtype)
    rois = torch.cat([batch, xy1, xy1 + wh], 1).to(dtype)
    rois[2, [1, 3]] = rois[2, [3, 1]]  # x2 < x1: no samples when adaptive, mirrored ones otherwise
    input = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    offset = ((torch.rand(k, 2, *output_size, generator=g, dtype=dtype) - 0.5) * 2 * offset_scale)
    return input, rois, offset
