"""The model layer: dcn_det.ops registered into mmdet's MODELS, the backbone and the RoI extractor."""
from mmdet.registry import MODELS

from dcn_det.ops import DeformRoIPool, ModulatedDeformRoIPool

from .backbones import DCNResNet
from .layers import DeformConv2dPack, ModulatedDeformConv2dPack
from .roi_heads import DeformRoIExtractor

# the ops layer knows no registry: its RoI pooling layers are registered here
MODELS.register_module(module=ModulatedDeformRoIPool)
MODELS.register_module(module=DeformRoIPool)

__all__ = ['DCNResNet', 'DeformConv2dPack', 'DeformRoIExtractor', 'ModulatedDeformConv2dPack']
