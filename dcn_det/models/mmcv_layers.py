"""mmcv's deformable RoI pooling layers and ``MaskedConv2d`` on dcn_det's kernels (mmcv 2.1 has no CPU
kernel for either), as subclasses of mmcv's classes with the same parameters and state-dict keys.

Only ``forward`` changes; :func:`dcn_det.convert_mmcv_ops` turns mmcv's instances into these classes
in place. (dcn_det's own RoI pooling layers, built from configs, are :mod:`dcn_det.ops.deform_roi_pool`.)
"""
from typing import Optional

import torch
import torch.nn.functional as F
from mmcv.ops import DeformRoIPool as _MMCVDeformRoIPool
from mmcv.ops import DeformRoIPoolPack as _MMCVDeformRoIPoolPack
from mmcv.ops import MaskedConv2d as _MMCVMaskedConv2d
from mmcv.ops import ModulatedDeformRoIPoolPack as _MMCVModulatedDeformRoIPoolPack
from torch import Tensor

from dcn_det.ops import deform_roi_pool
from dcn_det.ops._common import mmcv_has_cuda
from dcn_det.ops.deform_roi_pool import _predict


class _Pool:
    """The call into :func:`dcn_det.ops.deform_roi_pool` with the layer's geometry and ``backend``."""

    layer_name: Optional[str] = None  # set by the model that holds the layer, for error messages
    backend = 'auto'  # 'native', 'torchvision' (inference and ONNX export) or 'mmcv' (CUDA only)

    def _pool(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        try:
            return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
                                   self.gamma, self.backend)
        except ValueError as e:  # NonFiniteError and the op's argument errors: say which layer
            raise type(e)(f'{self.layer_name or type(self).__name__}: {e}') from None

    def extra_repr(self) -> str:
        return (f'output_size={self.output_size}, spatial_scale={self.spatial_scale}, '
                f'sampling_ratio={self.sampling_ratio}, gamma={self.gamma}, backend={self.backend!r}')


class DeformRoIPool(_Pool, _MMCVDeformRoIPool):
    """mmcv's ``DeformRoIPool``: offsets from the caller.

    Shapes: input (Tensor[N, C, H, W]), rois (Tensor[K, 5]) (batch_index, x1, y1, x2, y2),
    offset (Tensor[K, 2, ph, pw], optional) -> Tensor[K, C, ph, pw].
    """

    def forward(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        return self._pool(input, rois, offset)


class _PackForward(_Pool):
    """Plain pool, ``offset_fc`` (and ``mask_fc``) on it, pool with the offsets (times the mask), as mmcv."""

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        """input (Tensor[N, output_channels, H, W]), rois (Tensor[K, 5]) -> Tensor[K, output_channels, ph, pw]."""
        if input.size(1) != self.output_channels:
            raise ValueError(f'{self.layer_name or type(self).__name__}: input has {input.size(1)} channels but '
                             f'the layer was built with output_channels={self.output_channels}')
        offset, mask = _predict(self, self._pool(input, rois).flatten(1), self.output_size)
        out = self._pool(input, rois, offset.to(input.dtype))  # under autocast the fc ran in low precision
        return out if mask is None else out * mask


class DeformRoIPoolPack(_PackForward, _MMCVDeformRoIPoolPack):
    """mmcv's ``DeformRoIPoolPack`` (DCNv1 RoI pooling with its ``offset_fc``), on dcn_det's op."""


class ModulatedDeformRoIPoolPack(_PackForward, _MMCVModulatedDeformRoIPoolPack):
    """mmcv's ``ModulatedDeformRoIPoolPack`` (DCNv2: ``offset_fc`` and ``mask_fc``), on dcn_det's op."""


class MaskedConv2d(_MMCVMaskedConv2d):
    """mmcv's ``MaskedConv2d`` (guided anchoring's test path) without its compiled kernel off CUDA.

    mmcv computes the convolution (stride 1, plus bias) only where ``mask > 0`` and writes 0 elsewhere;
    here the dense convolution is computed and the rest zeroed, which is the same output. On CUDA with
    mmcv's CUDA kernels, mmcv's layer runs.

    Shapes: input (Tensor[N, C_in, H, W]), mask (Tensor[N or 1, H, W], optional; None: a plain conv)
    -> Tensor[N, C_out, H, W].
    """

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if mask is None or (input.is_cuda and mmcv_has_cuda()):
            return super().forward(input, mask)
        if self.stride != (1, 1):
            raise ValueError(f'MaskedConv2d with a mask supports stride 1 only (as mmcv), got {self.stride}')
        # mmcv's masked path ignores dilation and groups (it unfolds with plain kernel offsets, one group)
        out = F.conv2d(input, self.weight, self.bias, 1, self.padding)
        return torch.where((mask > 0).unsqueeze(1), out, 0)
