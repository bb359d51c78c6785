"""The model layer: dcn_det.ops registered into mmdet's MODELS, the backbone, the RoI extractor, and
:func:`convert_mmcv_ops` (mmdet models built on mmcv's deformable layers, moved onto dcn_det's kernels)."""
from mmdet.registry import MODELS

from dcn_det.ops import DeformRoIPool, ModulatedDeformRoIPool

from .layers import DeformConv2dPack, ModulatedDeformConv2dPack

# Short aliases as in mmdet's config names (mdconv / dconv); mmcv's own 'DCNv2'/'DCN' stay mmcv's.
MODELS.register_module('MDConv', module=ModulatedDeformConv2dPack)
MODELS.register_module('DConv', module=DeformConv2dPack)
MODELS.register_module(module=ModulatedDeformRoIPool)
MODELS.register_module(module=DeformRoIPool)

from .backbones import DCNResNet  # noqa: E402
from .convert import convert_mmcv_ops, mmcv_ops_report  # noqa: E402
from .roi_heads import DeformRoIExtractor  # noqa: E402

__all__ = ['DCNResNet', 'DeformConv2dPack', 'DeformRoIExtractor', 'ModulatedDeformConv2dPack', 'convert_mmcv_ops',
           'mmcv_ops_report']
