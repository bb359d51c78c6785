# Mask demo, plain: no deformable layer (the baseline for shapes_r18_mask_dcnv2.py).
_base_ = './_base_/shapes_r18_mask_cpu.py'
