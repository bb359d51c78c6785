"""Every shipped config builds through mmdet's registry and runs a loss and a predict step."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from tests._helpers import CONFIG_DIR, shrink_detector

CONFIGS = sorted(glob.glob(osp.join(CONFIG_DIR, '*.py')))


def test_configs_are_found():
    names = {osp.basename(p) for p in CONFIGS}
    assert {'faster_rcnn_dcnv2.py', 'faster_rcnn_r50_fpn.py', 'faster_rcnn_mdconv.py', 'faster_rcnn_mdpool.py',
            'faster_rcnn_dcnv1.py', 'faster_rcnn_dcnv2_r101.py', 'mask_rcnn_dcnv2.py', 'mask_rcnn_dcnv2_r101.py',
            'cascade_rcnn_dcnv2.py', 'cascade_rcnn_dcnv2_r101.py', 'cascade_mask_rcnn_dcnv2.py',
            'cascade_mask_rcnn_dcnv2_r101.py', 'shapes_r18_mask_plain.py', 'shapes_r18_mask_dcnv2.py'} <= names


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_loss_and_predict(path, tiny_inputs):
    from mmdet.registry import MODELS

    cfg = shrink_detector(Config.fromfile(path))
    # as with the configs' pretrained backbones: mmdet's zero_init_residual (from-scratch init) zeroes each block's
    # last BN, which stops every gradient into the residual branch, conv_offset included, at step 0
    cfg.model.backbone.zero_init_residual = False
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    data = model.data_preprocessor(tiny_inputs, True)
    losses = model(**data, mode='loss')
    with_mask = cfg.model.roi_head.get('mask_head') is not None
    assert any('loss_mask' in k for k in losses) == with_mask
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total) and total > 0
    total.backward()
    _check_offset_gradients(cfg, dict(model.named_parameters()))
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(tiny_inputs, False), mode='predict')
    assert len(results) == 2 and all(r.pred_instances.bboxes.shape[-1] == 4 for r in results)
    for r in results:  # one (H, W) mask per box, in the original image's size
        pred = r.pred_instances
        assert ('masks' in pred) == with_mask
        if with_mask:
            assert pred.masks.shape == (len(pred.bboxes), *r.ori_shape) and pred.masks.dtype == torch.bool


def _check_offset_gradients(cfg, params):
    """Rule: every offset/mask predictor of a deformable config learns from the first step.

    All of them start at zero (so a fresh layer computes what the plain one does), yet the loss depends on
    offsets and masks: the backbone's one-conv ``conv_offset`` and the RoI predictors' last Linear get a
    non-zero gradient. The RoI fc layers before that last zero Linear get exactly zero at step 0.
    """
    grad = {n: p.grad for n, p in params.items()}
    conv_offset = [n for n in grad if '.conv_offset.' in n]
    fc = [n for n in grad if '.offset_fc.' in n or '.mask_fc.' in n]
    last = [n for n in fc if '.offset_fc.4.' in n or '.mask_fc.2.' in n]
    deform_pool = cfg.model.roi_head.bbox_roi_extractor.roi_layer.type in ('DeformRoIPool', 'ModulatedDeformRoIPool')
    assert bool(conv_offset) == (cfg.model.backbone.get('dcn') is not None)
    assert bool(last) == deform_pool
    for name in conv_offset + last:
        assert grad[name] is not None and grad[name].abs().sum() > 0, f'{name} gets no gradient'
    for name in set(fc) - set(last):
        assert grad[name] is not None and not grad[name].any(), f'{name}: the last fc layer is not zero at init'


def test_flagship_config_is_the_paper_setting():
    cfg = Config.fromfile(osp.join(CONFIG_DIR, 'faster_rcnn_dcnv2.py'))
    bb, ext = cfg.model.backbone, cfg.model.roi_head.bbox_roi_extractor
    assert (bb.type, bb.depth, bb.dcn.type, tuple(bb.stage_with_dcn)) == ('DCNResNet', 50, 'MDConv',
                                                                           (False, True, True, True))
    assert (ext.type, ext.roi_layer.type) == ('DeformRoIExtractor', 'ModulatedDeformRoIPool')
    assert cfg.optim_wrapper.optimizer.lr == 0.02 and cfg.train_dataloader.batch_size == 2
    assert cfg.optim_wrapper.paramwise_cfg.dcn_offset_lr_mult == 0.1
    assert cfg.train_cfg.max_epochs == 12 and cfg.data_root == 'data/coco/'
    assert not any('://' in str(v) for v in (bb.init_cfg.checkpoint, cfg.load_from))


@pytest.mark.parametrize('name, mmdet_base', [
    ('mask_rcnn_dcnv2', 'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'),
    ('cascade_rcnn_dcnv2', 'cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py'),
    ('cascade_mask_rcnn_dcnv2', 'cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py'),
])
def test_mask_and_cascade_configs_are_mmdets_1x_with_dcnv2(name, mmdet_base):
    cfg = Config.fromfile(osp.join(CONFIG_DIR, f'{name}.py'))
    import mmdet

    theirs = Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', mmdet_base))
    theirs = Config(_unscoped(theirs.to_dict()))
    cfg = Config(_unscoped(cfg.to_dict()))  # mmengine marks what an mmdet:: base set with _scope_
    # mmdet's recipe, unchanged: schedule, optimizer, data, heads other than the box extractor
    for key in ('train_cfg', 'param_scheduler', 'val_evaluator'):
        assert cfg[key] == theirs[key], key
    if 'mask_head' in cfg.model.roi_head:  # mmdet's CocoDataset, empty masks skipped
        assert cfg.train_dataloader.dataset.pop('type') == 'CocoMaskDataset'
        theirs.train_dataloader.dataset.pop('type')
    assert cfg.train_dataloader == theirs.train_dataloader
    assert cfg.optim_wrapper.optimizer == theirs.optim_wrapper.optimizer
    assert cfg.optim_wrapper.paramwise_cfg.dcn_offset_lr_mult == 0.1
    assert cfg.model.train_cfg == theirs.model.train_cfg and cfg.model.test_cfg == theirs.model.test_cfg
    assert cfg.model.roi_head.bbox_head == theirs.model.roi_head.bbox_head
    assert cfg.model.roi_head.get('mask_head') == theirs.model.roi_head.get('mask_head')
    # DCNv2: mdconv c3-c5, modulated deformable pooling in the box extractor, plain RoIAlign for masks
    bb, ext = cfg.model.backbone, cfg.model.roi_head.bbox_roi_extractor
    assert (bb.type, bb.dcn.type, tuple(bb.stage_with_dcn)) == ('DCNResNet', 'MDConv', (False, True, True, True))
    assert (ext.type, ext.roi_layer.type) == ('DeformRoIExtractor', 'ModulatedDeformRoIPool')
    if 'mask_head' in cfg.model.roi_head:
        assert cfg.model.roi_head.mask_roi_extractor == theirs.model.roi_head.mask_roi_extractor
        assert cfg.model.roi_head.mask_roi_extractor.roi_layer.type == 'RoIAlign'
    assert not any('://' in str(v) for v in (bb.init_cfg.checkpoint, cfg.load_from))


def _unscoped(node):
    if isinstance(node, dict):
        return {k: _unscoped(v) for k, v in node.items() if k != '_scope_'}
    if isinstance(node, (list, tuple)):
        return type(node)(_unscoped(v) for v in node)
    return node
