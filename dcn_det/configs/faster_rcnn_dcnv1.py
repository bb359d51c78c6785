# DCNv1: deformable convs (no modulation) in c3-c5 and deformable RoI pooling.
_base_ = ['./_base_/faster_rcnn_r50_fpn_coco.py', './_base_/dcn_layers.py']
model = dict(backbone=_base_.dconv_c3_c5, roi_head=dict(bbox_roi_extractor=_base_.dpool))
