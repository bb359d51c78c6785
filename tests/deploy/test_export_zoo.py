"""A converted mmdet zoo Faster R-CNN (mmcv's deformable layers) exports like dcn_det's own configs."""
import onnx
import pytest

from dcn_det import convert_mmcv_ops
from dcn_det.deploy import InputSpec, NotExportableError, OnnxDetector, TorchDetector, config_classes, export_onnx
from dcn_det.deploy.export import iter_nodes
from tests._zoo import build_random, zoo_config
from tests.deploy._models import NO_CUTOFF, assert_same_detections, make_image

# mdconv in the backbone and mdpool in the RoI head: both zoo configs, one model
CONFIG = 'dcnv2/faster-rcnn_r50_fpn_mdpool_1x_coco.py'
OUR_OPS = {'DeformConv', 'RoiAlign', 'NonMaxSuppression'}  # what dcn_det's DCNv2 configs export to


def _zoo_model():
    cfg = zoo_config(CONFIG, image_size=(64, 64))
    cfg.model.backbone.update(dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
                              stage_with_dcn=(False, True, True, True))  # = dcnv2/faster-rcnn_r50-mdconv-c3-c5
    cfg.model.test_cfg.rcnn.update(score_thr=NO_CUTOFF['score_thr'], max_per_img=NO_CUTOFF['max_per_img'])
    cfg.model.test_cfg.rpn.update(nms_pre=NO_CUTOFF['rpn_nms_pre'], max_per_img=NO_CUTOFF['rpn_max_per_img'],
                                  min_bbox_size=NO_CUTOFF['rpn_min_bbox_size'])
    return cfg, build_random(cfg).eval()


def test_a_converted_zoo_faster_rcnn_exports_to_standard_operators_and_agrees(tmp_path):
    cfg, model = _zoo_model()
    spec, classes = InputSpec.from_config(cfg), config_classes(cfg)
    with pytest.raises(NotExportableError, match="mmcv's compiled op cannot be traced"):
        export_onnx(model, spec, str(tmp_path / 'mmcv.onnx'), classes=classes, verify=False, optimize=False)
    convert_mmcv_ops(model)
    path = str(tmp_path / 'zoo.onnx')
    result = export_onnx(model, spec, path, classes=classes, config_path=CONFIG, config_text=cfg.pretty_text,
                         optimize=False)
    assert result.same_detections and result.max_abs_diff['scores'] < 1e-4
    graph = onnx.load(path)
    assert {node.domain for node in iter_nodes(graph)} <= {'', 'ai.onnx'} and not graph.functions
    assert OUR_OPS <= set(result.op_types)
    detector = OnnxDetector(path, threads=1)
    images = [make_image(50, 70, seed=1), make_image(90, 60, seed=2)]
    for got, want in zip(detector(images), TorchDetector(model, cfg)(images), strict=True):
        assert len(got.scores) > 10
        assert_same_detections(got, want, score_tol=1e-4, box_tol=2e-2)
