"""dcn_det: Deformable ConvNets v2 for MMDetection 3.x. Importing it registers everything in mmdet."""
from .env_check import check_mmcv

check_mmcv()  # before anything imports mmcv.ops: a clear message instead of a deep traceback

from . import engine, models, ops  # noqa: E402
from .engine import DCNRunner  # noqa: E402
from .models import DCNResNet, DeformRoIExtractor  # noqa: E402
from .ops import (DeformConv2dPack, DeformRoIPool, ModulatedDeformConv2dPack,  # noqa: E402
                  ModulatedDeformRoIPool, deform_conv2d, deform_roi_pool)

__version__ = '0.1.0'
__all__ = ['DCNResNet', 'DCNRunner', 'DeformConv2dPack', 'DeformRoIExtractor', 'DeformRoIPool',
           'ModulatedDeformConv2dPack', 'ModulatedDeformRoIPool', 'deform_conv2d', 'deform_roi_pool',
           'engine', 'models', 'ops']
