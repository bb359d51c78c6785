# The flagship: Faster R-CNN R50-FPN 1x with DCNv2 where the paper puts it: modulated deformable
# convs in every 3x3 conv of c3-c5 and modulated deformable RoI pooling.
_base_ = './_base_/faster_rcnn_r50_fpn_coco.py'
model = dict(
    backbone=dict(dcn=dict(_delete_=True, type='MDConv', deform_groups=1), stage_with_dcn=(False, True, True, True)),
    roi_head=dict(bbox_roi_extractor=dict(
        type='DeformRoIExtractor', share_offset_predictor=True,  # one offset predictor for every FPN level
        roi_layer=dict(_delete_=True, type='ModulatedDeformRoIPool', output_size=7, sampling_ratio=0, gamma=0.1,
                       deform_fc_channels=1024))))
