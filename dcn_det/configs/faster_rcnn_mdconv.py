# Modulated deformable convs in c3-c5 only (mmdet's model zoo has the same model).
_base_ = './_base_/faster_rcnn_r50_fpn_coco.py'
model = dict(
    backbone=dict(dcn=dict(_delete_=True, type='MDConv', deform_groups=1), stage_with_dcn=(False, True, True, True)))
