# Modulated deformable RoI pooling only (mmdet zoo: 38.7 box AP vs 37.4 plain).
_base_ = ['./_base_/faster_rcnn_r50_fpn_coco.py', './_base_/dcn_layers.py']
model = dict(roi_head=dict(bbox_roi_extractor=_base_.mdpool))
