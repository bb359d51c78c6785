"""dcn_det: Deformable ConvNets v2 for MMDetection 3.x. Importing it registers everything in mmdet."""
import warnings

# mmengine 0.10.7 and mmcv 2.1.0 import pkg_resources at import time: their deprecation, not our users'.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)

from .env_check import check_mmcv  # noqa: E402

check_mmcv()  # before anything imports mmcv.ops: a clear message instead of a deep traceback

from . import engine, models, ops  # noqa: E402
from .engine import DCNRunner  # noqa: E402
from .models import DCNResNet, DeformRoIExtractor  # noqa: E402
from .ops import (  # noqa: E402
                  DeformConv2dPack,
                  DeformRoIPool,
                  ModulatedDeformConv2dPack,
                  ModulatedDeformRoIPool,
                  deform_conv2d,
                  deform_roi_pool,
)

__version__ = '0.1.0'
__all__ = ['DCNResNet', 'DCNRunner', 'DeformConv2dPack', 'DeformRoIExtractor', 'DeformRoIPool',
           'ModulatedDeformConv2dPack', 'ModulatedDeformRoIPool', 'deform_conv2d', 'deform_roi_pool',
           'engine', 'models', 'ops']
