# Demo, DCNv2: modulated deformable convs in c3-c5 and modulated deformable RoI pooling.
_base_ = ['./_base_/shapes_r18_cpu.py', './_base_/dcn_layers.py']
model = dict(backbone=_base_.mdconv_c3_c5, roi_head=dict(bbox_roi_extractor=_base_.mdpool_cpu))
