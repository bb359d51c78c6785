# DCNv1: deformable convs (no modulation) in c3-c5 and deformable RoI pooling.
_base_ = './_base_/faster_rcnn_r50_fpn_coco.py'
model = dict(
    backbone=dict(dcn=dict(_delete_=True, type='DConv', deform_groups=1), stage_with_dcn=(False, True, True, True)),
    roi_head=dict(bbox_roi_extractor=dict(
        type='DeformRoIExtractor', share_offset_predictor=True,  # one offset predictor for every FPN level
        roi_layer=dict(_delete_=True, type='DeformRoIPool', output_size=7, sampling_ratio=0, gamma=0.1,
                       deform_fc_channels=1024))))
