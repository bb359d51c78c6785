import pytest
import torch
from mmdet.registry import MODELS
from mmengine.registry import init_default_scope

import dcn_det  # noqa: F401  registers
from dcn_det.ops import RoIOffsetPredictor


def _extractor(layer='ModulatedDeformRoIPool', share=True, channels=8):
    init_default_scope('mmdet')
    return MODELS.build(dict(type='DeformRoIExtractor', out_channels=channels, featmap_strides=[4, 8, 16, 32],
                             roi_layer=dict(type=layer, output_size=7, sampling_ratio=0, deform_fc_channels=32),
                             share_offset_predictor=share))


def _feats_and_rois(channels=8):
    torch.manual_seed(0)
    feats = tuple(torch.rand(2, channels, 128 // s, 128 // s) for s in (4, 8, 16, 32))
    rois = torch.tensor([[0, 4., 4., 40., 30.], [1, 10., 20., 120., 110.], [0, 0., 0., 127., 127.],
                         [1, 50., 60., 58., 70.]])
    return feats, rois


def test_fresh_pools_equal_roi_align_and_half_of_it():
    """Zero-initialised offsets: DeformRoIPool == RoIAlign(aligned); the modulated one is half of it."""
    feats, rois = _feats_and_rois()
    plain = MODELS.build(dict(type='SingleRoIExtractor', out_channels=8, featmap_strides=[4, 8, 16, 32],
                              roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0, aligned=True)))
    expected = plain(feats, rois)
    torch.testing.assert_close(_extractor('DeformRoIPool')(feats, rois), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_extractor()(feats, rois), 0.5 * expected, rtol=1e-5, atol=1e-5)


def test_shared_predictor_is_the_extractors_own_and_fewer_parameters():
    shared, per_level = _extractor(share=True), _extractor(share=False)
    assert isinstance(shared.offset_predictor, RoIOffsetPredictor)
    assert not [p for layer in shared.roi_layers for p in layer.parameters()]  # the levels hold no predictor
    assert per_level.offset_predictor is None
    assert per_level.roi_layers[1].offset_fc is not per_level.roi_layers[0].offset_fc
    n_shared = sum(p.numel() for p in shared.parameters())
    n_per_level = sum(p.numel() for p in per_level.parameters())
    assert n_per_level == 4 * n_shared
    assert [layer.spatial_scale for layer in shared.roi_layers] == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert shared.roi_layers[0].output_channels == 8  # filled in from out_channels
    assert all(k.startswith(('offset_predictor.offset_fc.', 'offset_predictor.mask_fc.')) for k in shared.state_dict())


def test_shared_predictor_builds_one_optimizer_group_per_parameter():
    from mmengine.optim import build_optim_wrapper

    extractor = _extractor()
    wrapper = build_optim_wrapper(extractor, dict(
        optimizer=dict(type='SGD', lr=0.02),
        paramwise_cfg=dict(custom_keys={'offset_fc': dict(lr_mult=0.1), 'mask_fc': dict(lr_mult=0.1)})))
    params = [p for g in wrapper.optimizer.param_groups for p in g['params']]
    assert len(params) == len({id(p) for p in params}) == len(list(extractor.parameters()))
    assert all(g['lr'] == pytest.approx(0.002) for g in wrapper.optimizer.param_groups)


def test_shared_predictor_gets_gradients_from_every_level():
    """RoIs of every size go to their own FPN level, and each level's RoIs move the one shared predictor."""
    extractor = _extractor()
    torch.manual_seed(0)
    feats = tuple(torch.rand(1, 8, 960 // s, 960 // s) for s in (4, 8, 16, 32))
    # sqrt(area) 40 / 150 / 300 / 600 px -> levels 0 / 1 / 2 / 3 (finest_scale 56: < 112, < 224, < 448, >= 448)
    rois = torch.tensor([[0, 10., 10., 50., 50.], [0, 100., 100., 250., 250.], [0, 300., 300., 600., 600.],
                         [0, 200., 200., 800., 800.]])
    assert extractor.map_roi_levels(rois, 4).tolist() == [0, 1, 2, 3]
    predictor = extractor.offset_predictor
    for stack in (predictor.offset_fc, predictor.mask_fc):  # let the output depend on every predictor layer
        torch.nn.init.normal_([m for m in stack if isinstance(m, torch.nn.Linear)][-1].weight, std=0.01)
    out = extractor(feats, rois)
    first_layers = [predictor.offset_fc[0].weight, predictor.mask_fc[0].weight]
    grads = [torch.autograd.grad(out[level].sum(), first_layers, retain_graph=True) for level in range(4)]
    for level, (offset_grad, mask_grad) in enumerate(grads):
        assert offset_grad.abs().sum() > 0 and mask_grad.abs().sum() > 0, f'level {level} does not reach the predictor'
    assert not torch.equal(grads[0][0], grads[3][0])


def test_no_rois_gives_empty_output():
    feats, _ = _feats_and_rois()
    assert _extractor()(feats, torch.zeros(0, 5)).shape == (0, 8, 7, 7)


def test_unknown_layer_is_a_registry_error():
    with pytest.raises(KeyError, match='NoSuchPool'):
        _extractor('NoSuchPool')
