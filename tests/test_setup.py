"""The installed stack: pinned versions, mmcv's compiled ops, mmdet's own detector on CPU."""
import importlib
import os.path as osp
import re

import pytest
import torch

from tests._helpers import REPO


def _pins():
    text = open(osp.join(REPO, 'pyproject.toml')).read()
    return dict(re.findall(r'"([a-z0-9_-]+)==([0-9.]+)"', text))


def test_installed_versions_are_the_pins():
    import mmcv
    import mmdet
    import mmengine
    import torchvision

    pins = _pins()
    assert torch.__version__.split('+')[0] == pins['torch']
    assert torchvision.__version__.split('+')[0] == pins['torchvision']
    assert (mmcv.__version__, mmengine.__version__, mmdet.__version__) == (pins['mmcv'], pins['mmengine'],
                                                                         pins['mmdet'])


def test_dcn_det_mmdet_and_mmcv_ops_import():
    import mmcv.ops

    import dcn_det

    assert importlib.import_module('mmcv._ext') is not None
    assert hasattr(mmcv.ops, 'modulated_deform_conv2d') and dcn_det.DCNResNet is not None


def test_env_check_names_the_fix_for_mmcv_without_ops(monkeypatch):
    from dcn_det import env_check

    real = importlib.import_module

    def no_ext(name, *args, **kwargs):
        if name == 'mmcv._ext':
            raise ModuleNotFoundError("No module named 'mmcv._ext'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(env_check.importlib, 'import_module', no_ext)
    with pytest.raises(env_check.MMCVInstallError, match=r'without its compiled ops.*make setup'):
        env_check.check_mmcv()


def test_env_check_names_the_fix_for_the_wrong_mmcv(monkeypatch):
    import mmcv

    from dcn_det import env_check

    monkeypatch.setattr(mmcv, '__version__', '2.2.0')
    with pytest.raises(env_check.MMCVInstallError, match=r'mmcv 2\.2\.0 is installed but dcn_det needs mmcv==2\.1\.0'):
        env_check.check_mmcv()


def test_mmdets_own_faster_rcnn_runs_a_loss_step_on_cpu(tiny_inputs):
    from mmdet.registry import MODELS
    from mmengine.hub import get_config
    from mmengine.registry import init_default_scope

    cfg = get_config('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py')
    cfg.model.backbone.init_cfg = None  # torchvision://resnet50 would download
    cfg.model.roi_head.bbox_head.num_classes = 3
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    model.init_weights()
    losses = model(**model.data_preprocessor(tiny_inputs, True), mode='loss')
    total, _ = model.parse_losses(losses)
    total.backward()
    assert torch.isfinite(total) and model.backbone.layer4[0].bn3.weight.grad.abs().sum() > 0
