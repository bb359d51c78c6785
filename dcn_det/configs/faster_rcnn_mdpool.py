# Modulated deformable RoI pooling only (mmdet's model zoo has the same model).
_base_ = './_base_/faster_rcnn_r50_fpn_coco.py'
model = dict(
    roi_head=dict(bbox_roi_extractor=dict(
        type='DeformRoIExtractor', share_offset_predictor=True,  # one offset predictor for every FPN level
        roi_layer=dict(_delete_=True, type='ModulatedDeformRoIPool', output_size=7, sampling_ratio=0, gamma=0.1,
                       deform_fc_channels=1024))))
