"""Checkpoint layouts of the RoI offset predictor: shared (``offset_predictor.*``; version 1:
``roi_layers.0.*``) and per level (mmdet's ``roi_layers.{i}.*``), converted on load where that is exact.

mmdet's per-level extractor is built from mmdet's own dpool / mdpool configs, with mmcv's
``DeformRoIPoolPack`` / ``ModulatedDeformRoIPoolPack``. mmcv has no CPU kernel for deformable RoI
pooling, so its packs run here with mmcv's own forward (and mmdet's level routing) on dcn_det's pooling
op, patched in for mmcv's ``deform_roi_pool``: what is compared is everything around the op (fc stacks,
reshapes, mask, levels). The op itself equals mmcv's kernel by tests/ops (float64 reference, golden case).
"""
import importlib

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.hub import get_config
from mmengine.registry import init_default_scope

import dcn_det  # noqa: F401  registers
from dcn_det.checkpoint import CheckpointLoadError, load_state_dict_strict
from dcn_det.ops import DeformRoIPool, ModulatedDeformRoIPool, RoIOffsetPredictor, deform_roi_pool

CHANNELS, FC = 8, 32
MMDET_CONFIGS = {'DeformRoIPool': 'mmdet::dcn/faster-rcnn_r50_fpn_dpool_1x_coco.py',
                 'ModulatedDeformRoIPool': 'mmdet::dcnv2/faster-rcnn_r50_fpn_mdpool_1x_coco.py'}


def _ours(layer='ModulatedDeformRoIPool', share=True):
    init_default_scope('mmdet')
    return MODELS.build(dict(type='DeformRoIExtractor', out_channels=CHANNELS, featmap_strides=[4, 8, 16, 32],
                             roi_layer=dict(type=layer, output_size=7, sampling_ratio=0, deform_fc_channels=FC),
                             share_offset_predictor=share))


def _mmdets(layer):
    """mmdet's extractor as its own dpool / mdpool config builds it (one mmcv pack per level), at test width."""
    cfg = get_config(MMDET_CONFIGS[layer]).model.roi_head.bbox_roi_extractor
    cfg.out_channels = cfg.roi_layer.output_channels = CHANNELS
    cfg.roi_layer.deform_fc_channels = FC
    init_default_scope('mmdet')
    return MODELS.build(cfg)


def _randomise(module, seed=0):
    """Every parameter random (the zero-initialised last layers too, so offsets and masks matter)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.05)
    return module


def _inputs():
    torch.manual_seed(1)
    feats = tuple(torch.rand(2, CHANNELS, 960 // s, 960 // s) for s in (4, 8, 16, 32))
    rois = torch.tensor([[0, 10., 10., 50., 50.], [1, 100., 120., 250., 240.], [0, 300., 290., 600., 610.],
                         [1, 200., 180., 800., 790.], [1, 30., 40., 90., 70.]])  # levels 0, 1, 2, 3, 0
    return feats, rois


def _version_1(state, prefix=''):
    """A state dict as version 1 of DeformRoIExtractor wrote it: the shared predictor under roi_layers.0."""
    old = type(state)((k.replace(f'{prefix}offset_predictor.', f'{prefix}roi_layers.0.'), v) for k, v in state.items())
    old._metadata = type(state._metadata)(state._metadata)
    old._metadata[prefix[:-1]] = {'version': 1}
    return old


def test_a_layer_called_with_a_predictor_equals_the_layer_holding_it():
    feats, rois = _inputs()
    own = _randomise(ModulatedDeformRoIPool(7, CHANNELS, FC, spatial_scale=1 / 8))
    predictor = RoIOffsetPredictor(7, CHANNELS, FC, modulated=True)
    predictor.load_state_dict(own.state_dict())  # the same keys: offset_fc.*, mask_fc.*
    borrowing = ModulatedDeformRoIPool(7, CHANNELS, FC, spatial_scale=1 / 8, own_predictor=False)
    assert not list(borrowing.parameters())
    torch.testing.assert_close(borrowing(feats[1], rois, predictor), own(feats[1], rois), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r'own_predictor=False: pass the shared predictor'):
        borrowing(feats[1], rois)
    with pytest.raises(ValueError, match='needs a predictor with mask_fc'):
        borrowing(feats[1], rois, RoIOffsetPredictor(7, CHANNELS, FC, modulated=False))


@pytest.mark.parametrize('ours, mmcvs', [(DeformRoIPool, 'DeformRoIPoolPack'),
                                         (ModulatedDeformRoIPool, 'ModulatedDeformRoIPoolPack')])
def test_a_layer_holding_its_predictor_has_mmcvs_keys(ours, mmcvs):
    import mmcv.ops

    theirs = getattr(mmcv.ops, mmcvs)(7, CHANNELS, deform_fc_channels=FC).state_dict()
    assert {k: v.shape for k, v in ours(7, CHANNELS, FC).state_dict().items()} == {k: v.shape for k, v in
                                                                                    theirs.items()}


@pytest.mark.parametrize('layer', ['DeformRoIPool', 'ModulatedDeformRoIPool'])
def test_mmdets_per_level_checkpoint_loads_key_for_key_and_gives_mmdets_outputs(layer, monkeypatch):
    feats, rois = _inputs()
    mmdets = _randomise(_mmdets(layer))
    state = mmdets.state_dict()
    assert {k.split('.', 2)[1] for k in state} == {'0', '1', '2', '3'}  # roi_layers.{i}.offset_fc.*, .mask_fc.*
    ours = _ours(layer, share=False)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in state.items()}
    ours.load_state_dict(state, strict=True)
    mmcv_module = importlib.import_module('mmcv.ops.deform_roi_pool')  # (mmcv.ops.deform_roi_pool: the function)
    monkeypatch.setattr(mmcv_module, 'deform_roi_pool', deform_roi_pool)  # mmcv has no CPU kernel
    torch.testing.assert_close(ours(feats, rois), mmdets(feats, rois), rtol=0, atol=0)


def test_shared_checkpoint_loads_into_a_per_level_extractor_with_the_same_outputs():
    feats, rois = _inputs()
    shared = _randomise(_ours(share=True))
    per_level = _ours(share=False)
    per_level.load_state_dict(shared.state_dict(), strict=True)
    for layer in per_level.roi_layers:  # every level got a copy
        assert torch.equal(layer.offset_fc[4].weight, shared.offset_predictor.offset_fc[4].weight)
        assert torch.equal(layer.mask_fc[0].weight, shared.offset_predictor.mask_fc[0].weight)
    torch.testing.assert_close(per_level(feats, rois), shared(feats, rois), rtol=0, atol=0)


@pytest.mark.parametrize('share', [True, False], ids=['into-shared', 'into-per-level'])
def test_version_1_shared_checkpoint_still_loads(share):
    """Version 1 kept the shared predictor in the first level (roi_layers.0.offset_fc.*, nothing for the others)."""
    feats, rois = _inputs()
    shared = _randomise(_ours(share=True))
    old = _version_1(shared.state_dict())
    assert sorted({'.'.join(k.split('.')[:3]) for k in old}) == ['roi_layers.0.mask_fc', 'roi_layers.0.offset_fc']
    model = _ours(share=share)
    model.load_state_dict(old, strict=True)
    torch.testing.assert_close(model(feats, rois), shared(feats, rois), rtol=0, atol=0)


def test_version_1_detector_checkpoint_loads_through_the_tools_strict_loader(tmp_path):
    from mmengine.config import Config
    from mmengine.runner.checkpoint import load_state_dict as mmengine_load_state_dict

    from tests._helpers import CONFIG_DIR, shrink_detector

    cfg = shrink_detector(Config.fromfile(f'{CONFIG_DIR}/faster_rcnn_dcnv2.py'))
    init_default_scope('mmdet')
    trained = _randomise(MODELS.build(cfg.model))
    path = tmp_path / 'v1.pth'
    torch.save({'state_dict': _version_1(trained.state_dict(), 'roi_head.bbox_roi_extractor.')}, path)
    for load in (lambda model, state: load_state_dict_strict(model, state, 'v1.pth'),  # tools/test.py
                 lambda model, state: mmengine_load_state_dict(model, state, strict=True)):  # the runner's load_from
        model = MODELS.build(cfg.model)
        load(model, torch.load(path, weights_only=True)['state_dict'])
        expected = trained.state_dict()
        assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())


def test_per_level_checkpoint_into_a_shared_extractor_is_refused_with_the_reason():
    per_level = _randomise(_ours(share=False)).state_dict()
    with pytest.raises(ValueError, match=r"one offset predictor per FPN level \(mmdet's layout\).*cannot become one "
                                         r'exactly: build it with share_offset_predictor=False'):
        _ours(share=True).load_state_dict(per_level)
    with pytest.raises(CheckpointLoadError, match=r"^ckpt cannot be loaded: roi_layers: this checkpoint holds one"):
        load_state_dict_strict(_ours(share=True), per_level, 'ckpt')


def test_a_version_2_per_level_checkpoint_missing_levels_is_not_taken_for_a_shared_one():
    """Only version 1 wrote roi_layers.0 alone for a shared predictor: in version 2 that is an incomplete
    per-level checkpoint, reported as missing keys, not copied to every level."""
    state = _ours(share=False).state_dict()
    level_0 = type(state)((k, v) for k, v in state.items() if k.startswith('roi_layers.0.'))
    level_0._metadata = state._metadata
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "roi_layers\.1\.offset_fc'):
        _ours(share=False).load_state_dict(level_0, strict=True)
    _ours(share=False).load_state_dict(_version_1(level_0), strict=True)  # the same keys from version 1: shared
