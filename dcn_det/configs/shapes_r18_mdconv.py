# Demo, DCNv2 convs only (c3-c5).
_base_ = ['./_base_/shapes_r18_cpu.py', './_base_/dcn_layers.py']
model = dict(backbone=_base_.mdconv_c3_c5)
