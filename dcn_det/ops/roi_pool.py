"""``deform_roi_pool``: deformable RoI pooling, DCNv1 and DCNv2 (modulated), with mmcv's semantics.

``deform_roi_pool`` computes what mmcv's ``deform_roi_pool`` kernel computes: RoIAlign with the
half-pixel shift (``x * spatial_scale - 0.5``, no minimum RoI size), each bin's start moved by
``gamma * roi_width * offset[:, 0]`` in x and ``gamma * roi_height * offset[:, 1]`` in y, and each
bin averaged over a ``grid_h x grid_w`` sampling grid (``sampling_ratio``, or per RoI
``ceil(roi_size / output_size)`` when it is 0). A sample outside ``[-1, H] x [-1, W]`` counts 0;
otherwise its coordinates are clamped to ``[0, H - 1] x [0, W - 1]`` and it is interpolated
bilinearly. With no offset it equals ``torchvision.ops.roi_align(..., aligned=True)``.

Backends (``backend=``):

- ``'native'``: :mod:`dcn_det.ops.kernels.roi_pool_native` (public torch functions, any device,
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
    mmcv_has_cuda,
    pair,
)
from .kernels.roi_pool_native import NativeDeformRoIPool, Params

BACKEND_CHOICES = ('auto', 'native', 'mmcv', 'torchvision')


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
