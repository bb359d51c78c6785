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
            'faster_rcnn_dcnv1.py', 'faster_rcnn_dcnv2_r101.py'} <= names


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_loss_and_predict(path, tiny_inputs):
    from mmdet.registry import MODELS

    cfg = shrink_detector(Config.fromfile(path))
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    data = model.data_preprocessor(tiny_inputs, True)
    losses = model(**data, mode='loss')
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total) and total > 0
    total.backward()
    grads = [p.grad for n, p in model.named_parameters() if 'conv_offset' in n or 'offset_fc' in n]
    assert all(g is not None for g in grads)
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(tiny_inputs, False), mode='predict')
    assert len(results) == 2 and all(r.pred_instances.bboxes.shape[-1] == 4 for r in results)


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
