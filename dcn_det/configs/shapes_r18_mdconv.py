# Demo, DCNv2 convs only (c3-c5).
_base_ = './_base_/shapes_r18_cpu.py'
model = dict(
    backbone=dict(dcn=dict(_delete_=True, type='MDConv', deform_groups=1), stage_with_dcn=(False, True, True, True)))
