"""Deformable RoI pooling layers that predict their own offsets (mmcv's ``DeformRoIPoolPack`` and
``ModulatedDeformRoIPoolPack``, with the same parameter names), on :func:`dcn_det.ops.deform_roi_pool`.

Pure torch: no mmcv, mmdet or mmengine import (the models layer registers them).
"""
from typing import Optional

from torch import Tensor, nn

from ._common import IntPair, NonFiniteError, check_backend, pair
from .roi_pool import BACKEND_CHOICES, deform_roi_pool


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
