"""Deformable RoI pooling layers that predict their own offsets (mmcv's ``DeformRoIPoolPack`` and
``ModulatedDeformRoIPoolPack``, with the same parameter names), on :func:`dcn_det.ops.deform_roi_pool`.

Pure torch: no mmcv, mmdet or mmengine import (the models layer registers them).
"""
from typing import Optional

from torch import Tensor, nn

from ._common import IntPair, NonFiniteError, check_backend, pair
from .roi_pool import BACKEND_CHOICES, deform_roi_pool


class DeformRoIPool(nn.Module):
    """DCNv1 deformable RoI pooling with its offset predictor (mmcv's ``DeformRoIPoolPack``).

    Plain aligned RoIAlign, ``offset_fc`` on the flattened result, then :func:`deform_roi_pool` with
    those offsets. The last fc layer starts at zero, so a fresh module equals
    ``torchvision.ops.roi_align(..., aligned=True)``. Parameter names match mmcv's pack, so its state
    dicts load strictly. ``offset_fc`` is a plain attribute: assigning one module's predictor to
    another shares it (e.g. across FPN levels).

    Args:
        output_size (int or (int, int)): (ph, pw).
        output_channels (int): C, the channels of ``input``.
        deform_fc_channels (int): hidden width of the fc predictor.
        spatial_scale, sampling_ratio, gamma, backend: as in :func:`deform_roi_pool`.
    """

    layer_name: Optional[str] = None  # set by the model that holds the layer, for error messages

    def __init__(self,
                 output_size: IntPair,
                 output_channels: int,
                 deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0,
                 sampling_ratio: int = 0,
                 gamma: float = 0.1,
                 backend: str = 'auto') -> None:
        super().__init__()
        self.output_size = pair(output_size, 'output_size', 1)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)
        self.backend = check_backend(backend, BACKEND_CHOICES)
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = nn.Sequential(
            nn.Linear(bins * output_channels, deform_fc_channels), nn.ReLU(inplace=True),
            nn.Linear(deform_fc_channels, deform_fc_channels), nn.ReLU(inplace=True),
            nn.Linear(deform_fc_channels, bins * 2))
        nn.init.zeros_(self.offset_fc[-1].weight)
        nn.init.zeros_(self.offset_fc[-1].bias)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        """input (Tensor[N, C, H, W]), rois (Tensor[K, 5]) -> Tensor[K, C, ph, pw]."""
        flat = self._pool(input, rois).flatten(1)
        return self._pool(input, rois, self._offset(flat, input))

    def _pool(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        if input.dim() == 4 and input.shape[1] != self.output_channels:
            raise ValueError(f'input has {input.shape[1]} channels but this module was built with '
                             f'output_channels={self.output_channels}')
        try:
            return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale,
                                   self.sampling_ratio, self.gamma, self.backend)
        except NonFiniteError as e:
            raise NonFiniteError(f'{self.layer_name or type(self).__name__}: {e}') from None

    def _offset(self, flat: Tensor, input: Tensor) -> Tensor:
        # under autocast the fc runs in low precision whatever the features' dtype
        return self.offset_fc(flat).view(-1, 2, *self.output_size).to(input.dtype)

    def extra_repr(self) -> str:
        return (f'output_size={self.output_size}, output_channels={self.output_channels}, '
                f'spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, '
                f'gamma={self.gamma}, backend={self.backend!r}')


class ModulatedDeformRoIPool(DeformRoIPool):
    """DCNv2 modulated deformable RoI pooling (mmcv's ``ModulatedDeformRoIPoolPack``).

    As :class:`DeformRoIPool`, and the pooled result is multiplied per bin by
    ``mask_fc(plain pool)`` (Linear, ReLU, Linear, Sigmoid; last Linear zero-initialised, so a
    fresh module returns 0.5 x aligned RoIAlign). Same arguments as :class:`DeformRoIPool`.
    """

    def __init__(self,
                 output_size: IntPair,
                 output_channels: int,
                 deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0,
                 sampling_ratio: int = 0,
                 gamma: float = 0.1,
                 backend: str = 'auto') -> None:
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale,
                         sampling_ratio, gamma, backend)
        bins = self.output_size[0] * self.output_size[1]
        self.mask_fc = nn.Sequential(
            nn.Linear(bins * output_channels, deform_fc_channels), nn.ReLU(inplace=True),
            nn.Linear(deform_fc_channels, bins), nn.Sigmoid())
        nn.init.zeros_(self.mask_fc[2].weight)
        nn.init.zeros_(self.mask_fc[2].bias)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        """input (Tensor[N, C, H, W]), rois (Tensor[K, 5]) -> Tensor[K, C, ph, pw]."""
        flat = self._pool(input, rois).flatten(1)
        mask = self.mask_fc(flat).view(-1, 1, *self.output_size)
        return self._pool(input, rois, self._offset(flat, input)) * mask
