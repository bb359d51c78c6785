# Demo, modulated deformable RoI pooling only.
_base_ = ['./_base_/shapes_r18_cpu.py', './_base_/dcn_layers.py']
model = dict(roi_head=dict(bbox_roi_extractor=_base_.mdpool_cpu))
