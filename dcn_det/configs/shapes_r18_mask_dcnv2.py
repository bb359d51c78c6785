# Mask demo, DCNv2: modulated deformable convs in c3-c5 and modulated deformable RoI pooling in the box head
# (the mask head keeps RoIAlign, as mask_rcnn_dcnv2.py says why).
_base_ = './_base_/shapes_r18_mask_cpu.py'
model = dict(
    backbone=dict(dcn=dict(_delete_=True, type='MDConv', deform_groups=1), stage_with_dcn=(False, True, True, True)),
    roi_head=dict(bbox_roi_extractor=dict(
        type='DeformRoIExtractor', share_offset_predictor=True,  # one offset predictor for every FPN level
        roi_layer=dict(_delete_=True, type='ModulatedDeformRoIPool', output_size=7, sampling_ratio=0, gamma=0.1,
                       deform_fc_channels=256))))  # a hidden width to match the demo's 64-channel features
