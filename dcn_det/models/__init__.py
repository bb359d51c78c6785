"""The model layer: dcn_det.ops registered into mmdet's MODELS, the backbone and the RoI extractor."""
from mmdet.registry import MODELS

from dcn_det.ops import DeformRoIPool, ModulatedDeformRoIPool

from .layers import DeformConv2dPack, ModulatedDeformConv2dPack

# Short aliases as in mmdet's config names (mdconv / dconv); mmcv's own 'DCNv2'/'DCN' stay mmcv's.
MODELS.register_module('MDConv', module=ModulatedDeformConv2dPack)
MODELS.register_module('DConv', module=DeformConv2dPack)
MODELS.register_module(module=ModulatedDeformRoIPool)
MODELS.register_module(module=DeformRoIPool)

from .backbones import DCNResNet  # noqa: E402
from .roi_heads import DeformRoIExtractor  # noqa: E402

__all__ = ['DCNResNet', 'DeformConv2dPack', 'DeformRoIExtractor', 'ModulatedDeformConv2dPack']
