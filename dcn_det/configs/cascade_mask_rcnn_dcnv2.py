# Cascade Mask R-CNN R50-FPN 1x with DCNv2: modulated deformable convs in c3-c5 and modulated deformable RoI pooling
# in each stage's box extractor, one offset predictor per stage (as cascade_rcnn_dcnv2.py). The three stages' mask
# heads keep mmdet's plain RoIAlign (14x14), for the reason mask_rcnn_dcnv2.py gives.
_base_ = './_base_/cascade_mask_rcnn_r50_fpn_coco.py'
model = dict(
    backbone=dict(dcn=dict(_delete_=True, type='MDConv', deform_groups=1), stage_with_dcn=(False, True, True, True)),
    roi_head=dict(bbox_roi_extractor=dict(
        type='DeformRoIExtractor', share_offset_predictor=True,  # within a stage, one predictor for every FPN level
        roi_layer=dict(_delete_=True, type='ModulatedDeformRoIPool', output_size=7, sampling_ratio=0, gamma=0.1,
                       deform_fc_channels=1024))))
