# The flagship: Faster R-CNN R50-FPN 1x with DCNv2 where the paper puts it: modulated deformable
# convs in every 3x3 conv of c3-c5 and modulated deformable RoI pooling.
_base_ = ['./_base_/faster_rcnn_r50_fpn_coco.py', './_base_/dcn_layers.py']
model = dict(backbone=_base_.mdconv_c3_c5, roi_head=dict(bbox_roi_extractor=_base_.mdpool))
