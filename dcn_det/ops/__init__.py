"""Tensor-level deformable operators (no mmdet imports)."""
from .deform_conv import BACKENDS, deform_conv2d
from .deform_conv_pack import DeformConv2dPack, ModulatedDeformConv2dPack
from .deform_roi_pool import DeformRoIPool, ModulatedDeformRoIPool, deform_roi_pool

__all__ = ['BACKENDS', 'DeformConv2dPack', 'ModulatedDeformConv2dPack', 'deform_conv2d',
           'DeformRoIPool', 'ModulatedDeformRoIPool', 'deform_roi_pool']
