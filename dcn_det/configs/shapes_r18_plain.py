# Demo, plain: no deformable layer (the baseline for the DCN variants on the shapes data).
_base_ = './_base_/shapes_r18_cpu.py'
