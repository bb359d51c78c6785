"""Tensor-level deformable operators. Needs torch and torchvision only (no mmcv, mmdet or mmengine).

- :mod:`.conv`: ``deform_conv2d`` (functional API, argument checks, backends);
- :mod:`.roi_pool`: ``deform_roi_pool`` (likewise);
- :mod:`.modules`: the RoI pooling layers with their offset predictors;
- :mod:`.kernels`: dcn_det's own kernels (the ``torch.library`` op, compiled CPU kernels, public-API paths);
- :mod:`._common`: the checks, dtype rule and non-finite policy both ops share.

The deformable conv layers (mmcv-compatible packs) are in :mod:`dcn_det.models.layers`.
"""
from ._common import NonFiniteError
from .conv import BACKENDS, deform_conv2d
from .kernels.conv_native import cpu_kernel, use_cpu_kernel
from .modules import DeformRoIPool, ModulatedDeformRoIPool
from .roi_pool import deform_roi_pool

__all__ = ['BACKENDS', 'DeformRoIPool', 'ModulatedDeformRoIPool', 'NonFiniteError', 'cpu_kernel', 'deform_conv2d',
           'deform_roi_pool', 'use_cpu_kernel']
