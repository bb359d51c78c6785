"""The model layer: dcn_det.ops registered into mmdet's MODELS, the backbone, the RoI extractor, and
:func:`convert_mmcv_ops` (mmdet models built on mmcv's deformable layers, moved onto dcn_det's kernels)."""
from mmdet.registry import MODELS

from dcn_det.ops import DeformRoIPool, ModulatedDeformRoIPool

from .amp import CPUAmpOptimWrapper, keep_float32
from .backbones import DCNResNet
from .convert import convert_mmcv_ops, mmcv_ops_report
from .layers import DeformConv2dPack, ModulatedDeformConv2dPack
from .roi_heads import DeformRoIExtractor

# the ops layer knows no registry: its RoI pooling layers are registered here
MODELS.register_module(module=ModulatedDeformRoIPool)
MODELS.register_module(module=DeformRoIPool)

__all__ = ['CPUAmpOptimWrapper', 'DCNResNet', 'DeformConv2dPack', 'DeformRoIExtractor', 'ModulatedDeformConv2dPack',
           'convert_mmcv_ops', 'keep_float32', 'mmcv_ops_report']
