"""An RoI extractor whose pooling layer comes from the registry (deformable RoI pooling per FPN level)."""
from typing import List

from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
from mmdet.registry import MODELS
from mmdet.utils import ConfigType, OptMultiConfig
from torch import nn


@MODELS.register_module()
class DeformRoIExtractor(SingleRoIExtractor):
    """mmdet's ``SingleRoIExtractor`` with ``roi_layer`` built through ``MODELS``.

    mmdet resolves ``roi_layer.type`` as an attribute of ``mmcv.ops``, so a project's pooling layer
    can't be named there; this extractor builds ``dict(type='ModulatedDeformRoIPool', ...)``,
    ``'DeformRoIPool'`` or any registered layer, one per FPN level, with
    ``spatial_scale = 1 / stride`` and ``output_channels = out_channels`` filled in.

    Args:
        roi_layer (dict): the pooling layer config, e.g. ``dict(type='ModulatedDeformRoIPool',
            output_size=7, sampling_ratio=0, gamma=0.1)``.
        out_channels (int): channels of the input features (and of the pooled output).
        featmap_strides (list[int]): strides of the FPN levels.
        finest_scale (int): RoIs smaller than this go to the finest level (mmdet's rule).
        share_offset_predictor (bool): one offset/mask fc stack for all levels (default) instead of
            one per level as mmdet builds. With 256x7x7 inputs a stack is ~27M parameters: 4 levels
            cost ~107M unshared vs ~27M shared (see README, "Sharing the RoI offset predictor").
        init_cfg (dict | list[dict], optional): initialisation config.

    Inputs: ``feats`` (tuple of ``Tensor[N, C, H_l, W_l]``), ``rois (Tensor[K, 5])``
    (batch_index, x1, y1, x2, y2) in image coordinates. Output: ``Tensor[K, C, ph, pw]``.
    """

    def __init__(self,
                 roi_layer: ConfigType,
                 out_channels: int,
                 featmap_strides: List[int],
                 finest_scale: int = 56,
                 share_offset_predictor: bool = True,
                 init_cfg: OptMultiConfig = None) -> None:
        self._layer_channels = out_channels
        self._share = share_offset_predictor
        super().__init__(roi_layer, out_channels, featmap_strides, finest_scale, init_cfg)

    def build_roi_layers(self, layer_cfg: ConfigType, featmap_strides: List[int]) -> nn.ModuleList:
        cfg = dict(layer_cfg)
        if isinstance(cfg.get('type'), str) and cfg['type'] in ('DeformRoIPool', 'ModulatedDeformRoIPool'):
            cfg.setdefault('output_channels', self._layer_channels)
        layers = nn.ModuleList(MODELS.build(dict(cfg, spatial_scale=1 / s)) for s in featmap_strides)
        if self._share:
            for layer in layers[1:]:
                for name in ('offset_fc', 'mask_fc'):
                    if name in layer._modules:
                        # A plain (unregistered) reference to level 0's predictor: its parameters are
                        # registered once, so optimiser groups, state dicts and DDP see them once.
                        del layer._modules[name]
                        object.__setattr__(layer, name, getattr(layers[0], name))
        return layers
