"""An RoI extractor whose pooling layer comes from the registry (deformable RoI pooling per FPN level)."""
from typing import Dict, List, Optional

from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
from mmdet.registry import MODELS
from mmdet.utils import ConfigType, OptMultiConfig
from torch import Tensor, nn

from dcn_det.ops import DeformRoIPool, RoIOffsetPredictor

_PREDICTOR = ('offset_fc.', 'mask_fc.')


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
        share_offset_predictor (bool): one offset/mask predictor for all levels (default), the
            extractor's own ``offset_predictor``, instead of one per level as mmdet builds: a
            predictor's first fc layers take the whole C x ph x pw pooled feature, so per level it
            multiplies the model's largest layers by the number of levels (see docs/models.md, "Sharing
            the RoI offset predictor").
        init_cfg (dict | list[dict], optional): initialisation config.

    Inputs: ``feats`` (tuple of ``Tensor[N, C, H_l, W_l]``), ``rois (Tensor[K, 5])``
    (batch_index, x1, y1, x2, y2) in image coordinates. Output: ``Tensor[K, C, ph, pw]``.

    Checkpoint layouts of the offset predictor (converted on load where that is exact):

    - shared: ``offset_predictor.{offset_fc,mask_fc}.*``; version 1 of this class kept it in the
      first level, ``roi_layers.0.{offset_fc,mask_fc}.*``.
    - per level (mmdet's, as its mdpool configs write it): ``roi_layers.{i}.{offset_fc,mask_fc}.*``.

    A shared checkpoint loads into a per-level extractor (every level gets a copy, same outputs); a
    per-level one into a shared extractor is refused: its levels' predictors differ, one cannot
    stand for them.
    """

    # 2: a shared predictor is the extractor's own `offset_predictor`; 1: it sat in roi_layers.0 and
    # the other levels referred to it (with only roi_layers.0 keys, a version-1 checkpoint is shared)
    _version = 2

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
        first = self.roi_layers[0]
        self.offset_predictor: Optional[RoIOffsetPredictor] = None
        if isinstance(first, DeformRoIPool) and not first.own_predictor:
            self.offset_predictor = RoIOffsetPredictor(first.output_size, first.output_channels,
                                                       first.deform_fc_channels, first.modulated)

    def build_roi_layers(self, layer_cfg: ConfigType, featmap_strides: List[int]) -> nn.ModuleList:
        cfg = dict(layer_cfg)
        layer_type = MODELS.get(cfg['type']) if isinstance(cfg.get('type'), str) else cfg.get('type')
        if isinstance(layer_type, type) and issubclass(layer_type, DeformRoIPool):
            cfg.setdefault('output_channels', self._layer_channels)
            cfg['own_predictor'] = not self._share
        return nn.ModuleList(MODELS.build(dict(cfg, spatial_scale=1 / s)) for s in featmap_strides)

    def pool_level(self, level: int, feat: Tensor, rois: Tensor) -> Tensor:
        """Pool ``rois`` (Tensor[K, 5]) from ``feat`` with level ``level``'s layer (and the shared
        predictor): Tensor[K, C, ph, pw]."""
        layer = self.roi_layers[level]
        return layer(feat, rois) if self.offset_predictor is None else layer(feat, rois, self.offset_predictor)

    def forward(self, feats: tuple, rois: Tensor, roi_scale_factor: Optional[float] = None) -> Tensor:
        """``SingleRoIExtractor.forward``, every level's layer called through :meth:`pool_level`."""
        if self.offset_predictor is None:
            return super().forward(feats, rois, roi_scale_factor)
        num_levels = len(feats)
        roi_feats = feats[0].new_zeros(rois.size(0), self.out_channels, *self.roi_layers[0].output_size)
        levels = self.map_roi_levels(rois, num_levels)
        if roi_scale_factor is not None:
            rois = self.roi_rescale(rois, roi_scale_factor)
        for level in range(num_levels):
            inds = (levels == level).nonzero(as_tuple=False).squeeze(1)
            if inds.numel() > 0:
                roi_feats[inds] = self.pool_level(level, feats[level], rois[inds])
            else:
                # as mmdet: keep every level and parameter in the graph, or DDP waits for their gradients
                roi_feats = roi_feats + sum(p.view(-1)[0] for p in self.parameters()) * 0. + feats[level].sum() * 0.
        return roi_feats

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, *args, **kwargs) -> None:
        _to_layout(state_dict, prefix, local_metadata.get('version'), len(self.roi_layers),
                   shared=self.offset_predictor is not None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def _to_layout(state_dict: dict, prefix: str, version: Optional[int], num_levels: int, shared: bool) -> None:
    """Move the offset predictor's entries of ``state_dict`` (keys under ``prefix``) into the layout of a
    shared (``offset_predictor.*``) or per-level (``roi_layers.{i}.*``) extractor, in place."""
    def under(head: str) -> Dict[str, str]:  # predictor keys under prefix + head, by their name below it
        start = prefix + head
        return {k[len(start):]: k for k in state_dict if k.startswith(start) and k[len(start):].startswith(_PREDICTOR)}

    own = under('offset_predictor.')
    levels = [under(f'roi_layers.{i}.') for i in range(num_levels)]
    if not own and (version or 1) < 2 and levels[0] and not any(levels[1:]):
        own, levels = levels[0], [{}] * num_levels  # version 1's shared layout
    if shared and any(levels):
        raise ValueError(f'{prefix}roi_layers: this checkpoint holds one offset predictor per FPN level (mmdet\'s '
                         'layout) but this extractor shares one across levels (share_offset_predictor=True), and '
                         'several trained predictors cannot become one exactly: build it with '
                         'share_offset_predictor=False to load this checkpoint')
    if not own:
        return
    values = {name: state_dict.pop(key) for name, key in own.items()}
    targets = ['offset_predictor.'] if shared else [f'roi_layers.{i}.' for i in range(num_levels)]
    for head in targets:  # per level: each level gets the shared predictor's weights
        state_dict.update({prefix + head + name: value for name, value in values.items()})
