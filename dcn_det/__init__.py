"""dcn_det: Deformable ConvNets v2 for MMDetection 3.x. Importing it registers everything in mmdet.

On a machine with PyTorch alone (no mmcv and no mmdet, e.g. a bare GPU box) only :mod:`dcn_det.ops`
is loaded; where either is installed, mmcv must be a build mmdet 3.x accepts, with its ops
(:mod:`dcn_det.env_check` names the fix otherwise), and the models, engine and registrations load too.
``python -m dcn_det.env_check`` reports the environment without importing any of it, so that it can
say what is wrong with a stack that would stop this import.
"""
import sys
import warnings

__version__ = '0.1.0'


def _running_env_check() -> bool:
    argv = getattr(sys, 'orig_argv', [])
    return '-m' in argv and argv[argv.index('-m') + 1:argv.index('-m') + 2] == ['dcn_det.env_check']


if not _running_env_check():
    # mmengine 0.10 and mmcv 2.x import pkg_resources at import time: their deprecation, not our users'.
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)

    from . import ops
    from .model_zoo import get_config, get_config_file
    from .ops import DeformRoIPool, ModulatedDeformRoIPool, deform_conv2d, deform_roi_pool

    __all__ = ['DeformRoIPool', 'ModulatedDeformRoIPool', 'deform_conv2d', 'deform_roi_pool', 'get_config',
               'get_config_file', 'ops']

    from .env_check import _installed, check_stack  # the standard library alone

    if _installed('mmcv') or _installed('mmdet'):
        check_stack()  # before anything imports mmcv.ops: a clear message instead of a deep traceback

        from . import engine, models
        from .engine import DCNRunner
        from .models import (
            DCNResNet,
            DeformConv2dPack,
            DeformRoIExtractor,
            ModulatedDeformConv2dPack,
            convert_mmcv_ops,
            mmcv_ops_report,
        )

        __all__ += ['DCNResNet', 'DCNRunner', 'DeformConv2dPack', 'DeformRoIExtractor', 'ModulatedDeformConv2dPack',
                    'convert_mmcv_ops', 'engine', 'mmcv_ops_report', 'models']
