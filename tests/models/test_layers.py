"""The mmcv-compatible deformable conv layers of dcn_det.models.layers."""
from dcn_det.models.layers import DeformConv2dPack, ModulatedDeformConv2dPack


def test_layers_show_their_geometry_and_kernel_as_torchvision_does():
    v1, v2 = DeformConv2dPack(8, 16, 3, stride=2, padding=1, groups=2), ModulatedDeformConv2dPack(
        8, 16, (3, 1), padding=(1, 0), deform_groups=2, backend='native')
    assert repr(v1).splitlines()[1].strip() == ("8, 16, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), "
                                                "dilation=(1, 1), groups=2, bias=False, backend='auto'")
    assert repr(v2).splitlines()[1].strip() == ("8, 16, kernel_size=(3, 1), stride=(1, 1), padding=(1, 0), "
                                                "dilation=(1, 1), deform_groups=2, backend='native'")
    assert '(conv_offset): Conv2d' in repr(v1) and '(conv_offset): Conv2d' in repr(v2)
