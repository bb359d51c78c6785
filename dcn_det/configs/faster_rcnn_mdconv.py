# mdconv c3-c5 only (mmdet zoo: 41.4 box AP vs 37.4 plain).
_base_ = ['./_base_/faster_rcnn_r50_fpn_coco.py', './_base_/dcn_layers.py']
model = dict(backbone=_base_.mdconv_c3_c5)
