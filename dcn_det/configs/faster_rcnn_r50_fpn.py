# Plain baseline: Faster R-CNN R50-FPN 1x, no deformable layer.
_base_ = './_base_/faster_rcnn_r50_fpn_coco.py'
