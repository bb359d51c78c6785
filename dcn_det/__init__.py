"""dcn_det: Deformable ConvNets v2 for MMDetection 3.x. Importing it registers everything in mmdet.

On a machine with PyTorch alone (no mmcv and no mmdet, e.g. a bare GPU box) only :mod:`dcn_det.ops`
is loaded; where either is installed, mmcv must be the right build (:mod:`dcn_det.env_check` names
the fix otherwise) and the models, engine and registrations load too.
"""
import importlib.util
import warnings

# mmengine 0.10.7 and mmcv 2.1.0 import pkg_resources at import time: their deprecation, not our users'.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)

from . import ops  # noqa: E402
from .ops import DeformRoIPool, ModulatedDeformRoIPool, deform_conv2d, deform_roi_pool  # noqa: E402

__version__ = '0.1.0'
__all__ = ['DeformRoIPool', 'ModulatedDeformRoIPool', 'deform_conv2d', 'deform_roi_pool', 'ops']



def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


if _installed('mmcv') or _installed('mmdet'):
    from .env_check import check_mmcv

    check_mmcv()  # before anything imports mmcv.ops: a clear message instead of a deep traceback

    from . import engine, models  # noqa: E402
    from .engine import DCNRunner  # noqa: E402
    from .models import (  # noqa: E402
        DCNResNet,
        DeformConv2dPack,
        DeformRoIExtractor,
        ModulatedDeformConv2dPack,
        convert_mmcv_ops,
        mmcv_ops_report,
    )

    __all__ += ['DCNResNet', 'DCNRunner', 'DeformConv2dPack', 'DeformRoIExtractor', 'ModulatedDeformConv2dPack',
                'convert_mmcv_ops', 'engine', 'mmcv_ops_report', 'models']
