# Mask R-CNN R50-FPN 1x with DCNv2 where the paper puts it: modulated deformable convs in every 3x3 conv of c3-c5
# and modulated deformable RoI pooling in the box head. The mask head keeps mmdet's plain RoIAlign (14x14), as
# mmdet's own DCN Mask R-CNNs do: its output is a 28x28 grid of per-pixel labels whose targets are the ground-truth
# mask resampled on the RoI's regular grid, so each pooled bin must stay where its target pixel is; a learnt offset
# per bin would pool features from elsewhere than the pixel it is scored against.
_base_ = './_base_/mask_rcnn_r50_fpn_coco.py'
model = dict(
    backbone=dict(dcn=dict(_delete_=True, type='MDConv', deform_groups=1), stage_with_dcn=(False, True, True, True)),
    roi_head=dict(bbox_roi_extractor=dict(
        type='DeformRoIExtractor', share_offset_predictor=True,  # one offset predictor for every FPN level
        roi_layer=dict(_delete_=True, type='ModulatedDeformRoIPool', output_size=7, sampling_ratio=0, gamma=0.1,
                       deform_fc_channels=1024))))
