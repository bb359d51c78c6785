# Demo, modulated deformable RoI pooling only.
_base_ = './_base_/shapes_r18_cpu.py'
model = dict(
    roi_head=dict(bbox_roi_extractor=dict(
        type='DeformRoIExtractor', share_offset_predictor=True,  # one offset predictor for every FPN level
        roi_layer=dict(_delete_=True, type='ModulatedDeformRoIPool', output_size=7, sampling_ratio=0, gamma=0.1,
                       deform_fc_channels=256))))  # a hidden width to match the demo's 64-channel features
