# The deformable layers as model deltas; configs pick them with `_base_.<name>`.
# (`_delete_`: the shared base has dcn=None, a plain ResNet.)
mdconv_c3_c5 = dict(dcn=dict(_delete_=True, type='MDConv', deform_groups=1), stage_with_dcn=(False, True, True, True))
dconv_c3_c5 = dict(dcn=dict(_delete_=True, type='DConv', deform_groups=1), stage_with_dcn=(False, True, True, True))


def _pool(kind: str, deform_fc_channels: int = 1024) -> dict:
    # One offset (and mask) predictor shared by the FPN levels: README, "Sharing the RoI offset predictor".
    return dict(type='DeformRoIExtractor', share_offset_predictor=True,
                roi_layer=dict(_delete_=True, type=kind, output_size=7, sampling_ratio=0, gamma=0.1,
                               deform_fc_channels=deform_fc_channels))


mdpool = _pool('ModulatedDeformRoIPool')
dpool = _pool('DeformRoIPool')
mdpool_cpu = _pool('ModulatedDeformRoIPool', deform_fc_channels=256)  # the demo's 64-channel features
