"""Export to an OpenVINO IR and run it in OpenVINO: PyTorch's detections, OpenVINO's own deformable conv,
the ONNX file's metadata, and one-line refusals of a missing .bin, a bad precision or a stale IR."""
import json
import shutil

import numpy as np
import pytest

from dcn_det.deploy import (
    META,
    InputSpec,
    ModelMismatchError,
    NotExportableError,
    OpenVinoDetector,
    TorchDetector,
    config_classes,
    export_openvino,
    model_sha256,
)
from tests.deploy._models import NO_CUTOFF, assert_same_detections, make_image, tiny_config, tiny_model

ov = pytest.importorskip('openvino')


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A tiny DCNv2 detector (modulated deformable convs in c3-c5, modulated deformable RoI pooling) as an IR."""
    cfg = tiny_config('shapes_r18_dcnv2.py', **NO_CUTOFF)
    model = tiny_model(cfg)
    path = str(tmp_path_factory.mktemp('openvino') / 'dcnv2.xml')
    result = export_openvino(model, InputSpec.from_config(cfg), path, classes=config_classes(cfg),
                             config_path='shapes_r18_dcnv2.py', config_text=cfg.pretty_text,
                             model_digest=model_sha256(cfg))
    return cfg, model, path, result


@pytest.mark.slow  # the export `exported` builds
def test_openvino_gives_pytorchs_detections_in_f32(exported):
    cfg, model, path, result = exported
    assert result.same_detections and result.max_abs_diff['scores'] < 1e-4
    # the deformable convs are OpenVINO's own op; the deformable RoI pooling is ROIAlign over offset bins
    assert {'DeformableConvolution', 'ROIAlign', 'NonMaxSuppression'} <= set(result.op_types)
    detector = OpenVinoDetector(path, threads=1)
    images = [make_image(50, 70, seed=1), make_image(90, 60, seed=2)]  # not the batch the converter traced
    for got, want in zip(detector(images), TorchDetector(model, cfg)(images), strict=True):
        assert len(got.scores) > 10
        assert_same_detections(got, want, score_tol=1e-4, box_tol=2e-2)


@pytest.mark.slow  # an export
def test_dcnv1_without_mask_and_per_level_predictors_gives_pytorchs_detections(tmp_path):
    cfg = tiny_config('faster_rcnn_dcnv1.py', **NO_CUTOFF)  # DeformConv2d (no mask) in R50 bottlenecks, dpool
    cfg.model.roi_head.bbox_roi_extractor.share_offset_predictor = False
    model = tiny_model(cfg)
    path = str(tmp_path / 'dcnv1.xml')
    result = export_openvino(model, InputSpec.from_config(cfg), path, classes=config_classes(cfg))
    assert result.same_detections and 'DeformableConvolution' in result.op_types
    image = [make_image(90, 60, seed=2)]
    got, want = OpenVinoDetector(path, threads=1)(image)[0], TorchDetector(model, cfg)(image)[0]
    assert len(got.scores) > 10
    assert_same_detections(got, want, score_tol=1e-4, box_tol=2e-2)


@pytest.mark.slow  # the export `exported` builds
def test_the_ir_carries_the_onnx_files_metadata_and_f32_weights(exported):
    cfg, model, path, result = exported
    detector = OpenVinoDetector(path)
    meta = detector.metadata
    assert json.loads(meta[META['classes']]) == list(config_classes(cfg)) == list(detector.classes)
    assert detector.spec == InputSpec.from_config(cfg)
    assert meta[META['model_sha256']] == model_sha256(cfg) and meta[META['config_path']] == 'shapes_r18_dcnv2.py'
    assert json.loads(meta[META['input_shape']]) == [1, 3, 64, 64] == result.input_shape
    assert detector.batch_size == 1 and detector.fixed_shape == (64, 64)
    weights = [op for op in ov.Core().read_model(path).get_ordered_ops() if op.get_type_name() == 'Constant']
    assert not [op for op in weights if op.get_output_element_type(0) in (ov.Type.f16, ov.Type.bf16)]
    # OpenVINO's CPU default is bf16 where the CPU has it: the detector asks for f32 unless told
    assert 'float32' in str(detector.compiled.get_property('INFERENCE_PRECISION_HINT'))


@pytest.mark.slow  # the export `exported` builds
def test_an_image_without_proposals_gives_no_detections(exported):
    cfg, model, path, result = exported
    feed = {'images': np.zeros((1, 3, 64, 64), np.float32), 'img_shapes': np.zeros((1, 2), np.float32),
            'scale_factors': np.ones((1, 2), np.float64)}
    boxes, scores, labels, num = OpenVinoDetector(path).infer(feed)  # every proposal clipped to nothing
    assert num.tolist() == [0] and not boxes.any() and not scores.any() and (labels == -1).all()
    assert boxes.shape == (1, 2000, 4)


@pytest.mark.slow  # the export `exported` builds
def test_a_stale_ir_is_refused(exported):
    cfg, model, path, result = exported
    detector = OpenVinoDetector(path)
    detector.check_matches(cfg, 'tiny.py')
    cfg.model.test_cfg.rcnn.score_thr = 0.3  # the IR baked in 0.0
    try:
        with pytest.raises(ModelMismatchError, match=rf'^{path} is stale: it was exported from shapes_r18_dcnv2.py '
                                                     r'with another model section .* export it again with '
                                                     r'tools/export_openvino.py$'):
            detector.check_matches(cfg, 'tiny.py')
    finally:
        cfg.model.test_cfg.rcnn.score_thr = 0.0


@pytest.mark.slow  # the export `exported` builds
def test_a_missing_bin_or_a_bad_precision_is_refused(exported, tmp_path):
    cfg, model, path, result = exported
    lone = tmp_path / 'lone.xml'
    shutil.copy(path, lone)
    with pytest.raises(FileNotFoundError, match=r"lone.bin' is missing: an OpenVINO IR is .*lone.xml plus its "
                                                r"weights .* copy both, or export again$"):
        OpenVinoDetector(str(lone))
    for precision in ('f16', 'fp32', 'undefined'):  # OpenVINO would run f16 as bf16 on this kind of CPU
        with pytest.raises(ValueError, match=rf"^precision '{precision}' for {path}: use --precision f32"):
            OpenVinoDetector(path, precision=precision)


def test_an_ir_without_dcn_det_metadata_is_refused(tmp_path):
    from openvino import opset13 as ops

    x = ops.parameter([1, 3, 64, 64], np.float32, name='images')
    ov.save_model(ov.Model([ops.relu(x)], [x], 'other'), str(tmp_path / 'other.xml'))
    with pytest.raises(ModelMismatchError, match=r"other.xml' has no dcn_det metadata .* not written by "
                                                 r'tools/export_openvino.py'):
        OpenVinoDetector(str(tmp_path / 'other.xml'))


@pytest.mark.slow  # an export
def test_a_cascade_gives_pytorchs_detections_and_a_cascade_mask_model_is_refused(tmp_path):
    cfg = tiny_config('cascade_rcnn_dcnv2.py', **NO_CUTOFF)  # three stages, each its own offset predictor
    model = tiny_model(cfg)
    path = str(tmp_path / 'cascade.xml')
    result = export_openvino(model, InputSpec.from_config(cfg), path, classes=config_classes(cfg))
    assert result.same_detections
    image = [make_image(90, 60, seed=2)]
    got, want = OpenVinoDetector(path, threads=1)(image)[0], TorchDetector(model, cfg)(image)[0]
    assert len(got.scores) > 10
    assert_same_detections(got, want, score_tol=1e-4, box_tol=2e-2)
    cfg = tiny_config('cascade_mask_rcnn_dcnv2.py')
    with pytest.raises(NotExportableError, match='^a Cascade Mask R-CNN is not exported to OpenVINO'):
        export_openvino(tiny_model(cfg), InputSpec.from_config(cfg), str(tmp_path / 'mask.xml'),
                        classes=config_classes(cfg))


def test_refusals_before_any_work(tmp_path):
    cfg = tiny_config('shapes_r18_plain.py')
    model = tiny_model(cfg)
    spec, classes = InputSpec.from_config(cfg), config_classes(cfg)
    with pytest.raises(ValueError, match=r"a.onnx' must end in .xml"):
        export_openvino(model, spec, str(tmp_path / 'a.onnx'), classes=classes)
    (tmp_path / 'b.bin').write_bytes(b'')
    with pytest.raises(ValueError, match=r"b.bin' exists: remove it or choose another output path"):
        export_openvino(model, spec, str(tmp_path / 'b.xml'), classes=classes)
    with pytest.raises(ValueError, match='the model has 3 classes but the config names 2'):
        export_openvino(model, spec, str(tmp_path / 'c.xml'), classes=('x', 'y'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['b.bin']


def test_bf16_on_a_cpu_without_it_is_refused_not_run_in_f32(tmp_path, monkeypatch):
    (tmp_path / 'm.xml').write_text('<net/>')
    (tmp_path / 'm.bin').write_bytes(b'')
    answers = {'OPTIMIZATION_CAPABILITIES': ['FP32', 'INT8'], 'FULL_DEVICE_NAME': 'Old CPU'}
    monkeypatch.setattr(ov.Core, 'get_property', lambda self, device, name: answers[name])
    with pytest.raises(ValueError, match=r"^precision bf16 for .*m.xml: this CPU \(Old CPU\) has no bf16 in OpenVINO "
                                         r'\(it needs AVX512_BF16 or AMX\): use --precision f32$'):
        OpenVinoDetector(str(tmp_path / 'm.xml'), precision='bf16')
