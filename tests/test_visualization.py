"""dcn_det.visualization: composed sampling locations and coordinates, on hand-made offset maps."""
import pytest
import torch

from dcn_det import visualization as vis
from tests._helpers import GRID


def offset_map(h=6, w=6, stride=1, pad=1, dil=1, in_stride=8, dy=0.0, dx=0.0, mask=None, name='layer'):
    offset = torch.zeros(9, 2, h, w, dtype=torch.float64)
    offset[:, 0], offset[:, 1] = dy, dx
    mask = None if mask is None else torch.full((9, h, w), mask, dtype=torch.float64)
    return vis.OffsetMap(name, offset, mask, (3, 3), (stride, stride), (pad, pad), (dil, dil), in_stride)


# Composition and coordinates, on hand-made offset maps.

def test_zero_offsets_give_the_regular_grid_times_the_feature_stride():
    (points, weight), = vis.sampling_locations([offset_map(in_stride=8)], (2, 3))
    assert torch.equal(points, torch.tensor([[2 * 8, 3 * 8]]) + GRID * 8)
    assert torch.equal(weight, torch.ones(9, dtype=torch.float64))


def test_strided_dilated_layer_samples_its_input_at_stride_times_unit():
    # stride 2, padding 2, dilation 2 on a stride-16 input: unit (1, 1) reads rows/cols 0, 2, 4 = 0, 32, 64 px
    (points, _), = vis.sampling_locations([offset_map(stride=2, pad=2, dil=2, in_stride=16)], (1, 1))
    assert points.tolist() == [[y, x] for y in (0, 32, 64) for x in (0, 32, 64)]


def test_two_layers_compose_to_81_points_of_the_5x5_grid():
    lower, top = offset_map(name='lower'), offset_map(name='top')
    (p1, _), (p2, _) = vis.sampling_locations([lower, top], (2, 2))
    centre = torch.tensor([16.0, 16.0], dtype=torch.float64)
    assert torch.equal(p1, centre + GRID * 8)
    # point j of level 2 is kernel point j % 9 of the unit at level-1 point j // 9
    expected = torch.stack([centre + (a + b) * 8 for a in GRID for b in GRID])
    assert torch.equal(p2, expected)
    assert p2.unique(dim=0).shape[0] == 25


def test_composing_onto_a_strided_layer_maps_through_its_output_stride():
    # as R50's layer4.0.conv2 (stride 2: stride-16 input, stride-32 output) under layer4.1.conv2
    lower, top = offset_map(stride=2, in_stride=8, name='lower'), offset_map(in_stride=16, name='top')
    (p1, _), (p2, _) = vis.sampling_locations([lower, top], (2, 2))
    centre = torch.tensor([32.0, 32.0], dtype=torch.float64)
    assert torch.equal(p1, centre + GRID * 16)
    # level-1 point 32 + 16a is unit 2 + a of the lower layer, which reads (2 (2 + a) - 1 + k) * 8
    assert torch.equal(p2, torch.stack([centre + a * 16 + b * 8 for a in GRID for b in GRID]))


def test_constant_offsets_shift_every_level_by_the_offset_times_stride():
    shift = torch.tensor([1.0, 0.5], dtype=torch.float64)
    maps = [offset_map(dy=1.0, dx=0.5, name='lower'), offset_map(dy=1.0, dx=0.5, name='top')]
    zero = vis.sampling_locations([offset_map(), offset_map()], (2, 2))
    moved = vis.sampling_locations(maps, (2, 2))
    assert torch.equal(moved[0][0], zero[0][0] + shift * 8)
    # level 2: the units sampled are themselves shifted by one offset, then their own offset adds
    assert torch.equal(moved[1][0], zero[1][0] + 2 * shift * 8)


def test_lower_offsets_are_read_bilinearly_at_fractional_units():
    lower = offset_map(name='lower')
    lower.offset[:, 1] = torch.arange(6, dtype=torch.float64)  # dx = column index: bilinear is exact
    top = offset_map(dx=0.5, name='top')  # top points fall half-way between lower units
    (p1, _), (p2, _) = vis.sampling_locations([lower, top], (2, 2))
    cols = p1[:, 1] / 8  # fractional columns of the lower layer's units
    assert cols.frac().eq(0.5).all()
    expected_x = torch.stack([(c + GRID[:, 1] + c) * 8 for c in cols]).flatten()  # regular + offset = c
    assert torch.equal(p2[:, 1], expected_x)


def test_dcnv2_weights_are_the_product_of_masks_along_each_path():
    maps = [offset_map(mask=0.5, name='lower'), offset_map(mask=0.25, name='top')]
    (_, w1), (_, w2) = vis.sampling_locations(maps, (2, 2))
    assert torch.equal(w1, torch.full((9,), 0.25, dtype=torch.float64))
    assert torch.equal(w2, torch.full((81,), 0.125, dtype=torch.float64))


def test_resize_maps_pixel_centres_onto_pixel_centres():
    # scale 2 (w, h): input pixels 0..1 cover original pixel 0, centre 0.5 -> 0
    p = torch.tensor([[0.5, 1.0]], dtype=torch.float64)
    assert vis.to_original(p, (2.0, 4.0)).tolist() == [[(0.5 + 0.5) / 4 - 0.5, (1.0 + 0.5) / 2 - 0.5]]
    assert torch.allclose(vis.to_input(vis.to_original(p, (1.5, 0.75)), (1.5, 0.75)), p)


def test_panels_pick_the_nearest_unit_and_map_back_to_the_original_image():
    (panel,) = vis.make_panels([offset_map(in_stride=8)], [('p', (50.0, 20.0))], scale_factor=(0.5, 0.5))
    # original (y=50, x=20) -> input (24.75, 9.75) -> unit (3, 1) at input (24, 8) -> original (48.5, 16.5)
    assert panel.unit == (3, 1)
    assert panel.centre == (48.5, 16.5)
    expected = vis.to_original(torch.tensor([[24.0, 8.0]]) + GRID * 8, (0.5, 0.5))
    assert torch.equal(panel.levels[0][0], expected)


# The capture, on real deformable layers.

@pytest.mark.parametrize('modulated', [True, False], ids=['DCNv2', 'DCNv1'])
def test_capture_splits_offsets_and_masks_as_mmcv_does(modulated):
    from dcn_det.models import DeformConv2dPack, ModulatedDeformConv2dPack

    layer = (ModulatedDeformConv2dPack if modulated else DeformConv2dPack)(4, 4, 3, stride=2, padding=1)
    with torch.no_grad():
        layer.conv_offset.weight.zero_()
        layer.conv_offset.bias.zero_()
        layer.conv_offset.bias[0:18:2] = 1.0  # dy of the 9 kernel points
        layer.conv_offset.bias[1:18:2] = 0.5  # dx
        if modulated:
            layer.conv_offset.bias[18:] = 2.0  # mask logits
    with vis.OffsetCapture({'layer': layer}) as capture, torch.no_grad():
        layer(torch.rand(1, 4, 8, 8))
    (m,) = capture.maps((64, 64))
    assert (m.in_stride, m.out_stride, m.stride, tuple(m.offset.shape)) == (8, (16, 16), (2, 2), (9, 2, 4, 4))
    assert m.offset[:, 0].eq(1.0).all() and m.offset[:, 1].eq(0.5).all()
    assert m.mean_abs_offset() == pytest.approx((1 + 0.25) ** 0.5 * 8)
    if modulated:
        assert torch.allclose(m.mask, torch.sigmoid(torch.tensor(2.0, dtype=torch.float64)).expand(9, 4, 4))
    else:
        assert m.mask is None
