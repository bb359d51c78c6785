"""Tensor-level deformable operators. Needs torch and torchvision only (no mmcv, mmdet or mmengine).

- :mod:`.deform_conv`: everything about deformable convolution: ``deform_conv2d`` (functional API,
  argument checks, backends), the ``torch.library`` op, the choice of CPU kernel and the public-API
  kernel; its compiled CPU kernel is ``csrc/deform_conv_cpu.cpp`` (``dcn_det._C``, loaded by :mod:`._ext`);
- :mod:`.deform_roi_pool`: everything about deformable RoI pooling: ``deform_roi_pool``, the layers
  with their offset predictors, the native kernel;
- :mod:`._common`: what both share: argument checks, the dtype rule, the non-finite policy, the backends.

The deformable conv layers (mmcv-compatible packs) are in :mod:`dcn_det.models.layers`.
"""
from ._common import BACKEND_CHOICES, BACKENDS, NonFiniteError, cpu_flags, cpu_has_native_bf16
from .deform_conv import cpu_kernel, deform_conv2d, use_cpu_kernel
from .deform_roi_pool import DeformRoIPool, ModulatedDeformRoIPool, RoIOffsetPredictor, deform_roi_pool

__all__ = ['BACKENDS', 'BACKEND_CHOICES', 'DeformRoIPool', 'ModulatedDeformRoIPool', 'NonFiniteError',
           'RoIOffsetPredictor', 'cpu_flags', 'cpu_has_native_bf16', 'cpu_kernel', 'deform_conv2d', 'deform_roi_pool',
           'use_cpu_kernel']
