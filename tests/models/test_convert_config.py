"""The one-line config (``type='ConvertMMCVOps'``) through mmdet's registry and DetInferencer, and the tools'
default conversion with ``--keep-mmcv-ops``."""
import numpy as np
import pytest
from mmengine.config import Config

from dcn_det import mmcv_ops_report
from dcn_det.models.convert import CONVERT_TYPE, set_conversion
from tests._zoo import build_random, mmcv_kernels_forbidden, zoo_config

MDCONV = 'dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py'
ONE_LINE = """
_base_ = 'mmdet::{config}'
custom_imports = dict(imports=['dcn_det'], allow_failed_imports=False)
model = dict(type='ConvertMMCVOps', model_type={{{{_base_.model.type}}}})
"""


def test_the_builder_returns_mmdets_model_converted_with_mmdets_keys():
    from mmdet.models.detectors import FasterRCNN
    from mmdet.registry import MODELS

    cfg = zoo_config(MDCONV)
    plain = build_random(cfg)
    converted = MODELS.build(dict(cfg.model, type=CONVERT_TYPE, model_type=cfg.model.type))
    assert type(converted) is FasterRCNN and list(converted.state_dict()) == list(plain.state_dict())
    assert converted.state_dict().keys() == plain.state_dict().keys()
    report = mmcv_ops_report(converted)
    assert report.dcn_det == {'ModulatedDeformConv2dPack': 13} and not report.mmcv
    assert mmcv_ops_report(plain).mmcv == {'ModulatedDeformConv2dPack': 13}  # importing dcn_det changed nothing


def test_a_missing_model_type_is_one_clear_error():
    from mmdet.registry import MODELS

    with pytest.raises(ValueError, match=r"needs model_type, .* model = dict\(type='ConvertMMCVOps', model_type="):
        MODELS.build(dict(type=CONVERT_TYPE, backbone=dict(type='ResNet', depth=18)))


def test_one_line_in_an_mmdet_config_runs_mmdets_inferencer_on_dcn_det(tmp_path):
    from mmdet.apis import DetInferencer

    path = tmp_path / 'mdconv_on_dcn_det.py'
    path.write_text(ONE_LINE.format(config=MDCONV))
    cfg = Config.fromfile(str(path))
    assert cfg.model.type == CONVERT_TYPE and cfg.model.model_type == 'FasterRCNN'
    assert cfg.model.backbone.dcn.type == 'DCNv2'  # the rest of the model as mmdet's config has it
    cfg.model.backbone.init_cfg = None
    for step in cfg.test_dataloader.dataset.pipeline:
        if step['type'] == 'Resize':
            step['scale'] = (128, 96)
    inferencer = DetInferencer(model=cfg, device='cpu')  # builds with MODELS.build(cfg.model), no hooks
    assert mmcv_ops_report(inferencer.model).dcn_det == {'ModulatedDeformConv2dPack': 13}
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    with mmcv_kernels_forbidden():
        result = inferencer(image, return_vis=False)
    assert len(result['predictions']) == 1 and 'scores' in result['predictions'][0]


def test_mmengines_runner_builds_the_converted_model_as_mmdets_tools_do(tmp_path):
    from mmengine.runner import Runner

    cfg = zoo_config(MDCONV)
    runner = Runner(model=dict(cfg.model, type=CONVERT_TYPE, model_type=cfg.model.type), work_dir=str(tmp_path),
                    default_scope='mmdet')  # what mmdet's tools/train.py and tools/test.py build, via Runner.from_cfg
    assert mmcv_ops_report(runner.model).dcn_det == {'ModulatedDeformConv2dPack': 13}


def test_the_tools_convert_by_default_and_keep_mmcv_ops_undoes_a_configs_conversion(tmp_path):
    from tools import export_onnx, infer, test, train

    cfg = zoo_config(MDCONV)
    cfg.pop('custom_imports', None)
    set_conversion(cfg, True)
    assert (cfg.model.type, cfg.model.model_type) == (CONVERT_TYPE, 'FasterRCNN')
    assert cfg.custom_imports.imports == ['dcn_det']  # the work dir's copy of the config runs in mmdet's tools
    set_conversion(cfg, True)
    assert cfg.model.model_type == 'FasterRCNN'  # idempotent
    set_conversion(cfg, False)
    assert cfg.model.type == 'FasterRCNN' and 'model_type' not in cfg.model
    for tool, args in ((train, ['c.py']), (test, ['c.py', 'w.pth']), (infer, ['c.py', 'w.pth', 'img.jpg']),
                       (export_onnx, ['c.py', 'w.pth', 'o.onnx'])):
        assert not tool.parse_args(args).keep_mmcv_ops and tool.parse_args(args + ['--keep-mmcv-ops']).keep_mmcv_ops
