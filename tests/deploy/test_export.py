"""Export to ONNX and run in onnxruntime: the same detections as PyTorch, standard operators only."""
import json

import numpy as np
import onnx
import pytest

from dcn_det.deploy import (
    META,
    InputSpec,
    OnnxDetector,
    TorchDetector,
    check_standard,
    config_classes,
    export_onnx,
    read_metadata,
)
from dcn_det.deploy.agreement import layer_agreement
from dcn_det.deploy.export import iter_nodes
from tests.deploy._models import (
    NO_CUTOFF,
    assert_same_detections,
    make_image,
    mmdet_batch_predict,
    tiny_config,
    tiny_model,
)

# One export per kind of layer: plain, with a fixed batch of 2; DCNv2 (mdconv + mdpool, shared predictor)
# with dynamic shapes; DCNv1 (dconv + dpool) on R50 bottlenecks with one predictor per level. The images'
# resized sizes pad to 64x64, the fixed input's size, so that mmdet's padding and the model's agree.
VARIANTS = {  # name: (config, extractor settings, dynamic, batch size)
    'plain-batch2': ('shapes_r18_plain.py', dict(), False, 2),
    'dcnv2-dynamic': ('shapes_r18_dcnv2.py', dict(), True, 1),
    'dcnv1-per-level': ('faster_rcnn_dcnv1.py', dict(share_offset_predictor=False), False, 1),
}
IMAGES = [(50, 70, 1), (90, 60, 2)]


@pytest.fixture(scope='module', params=list(VARIANTS))
def exported(request, tmp_path_factory):
    name, extractor, dynamic, batch_size = VARIANTS[request.param]
    cfg = tiny_config(name, **NO_CUTOFF)
    cfg.model.roi_head.bbox_roi_extractor.update(extractor)
    model = tiny_model(cfg)
    path = str(tmp_path_factory.mktemp('onnx') / f'{request.param}.onnx')
    result = export_onnx(model, InputSpec.from_config(cfg), path, classes=config_classes(cfg), config_path=name,
                         config_text=cfg.pretty_text, dynamic=dynamic, batch_size=batch_size, optimize=False)
    return request.param, cfg, model, path, result


@pytest.mark.slow  # the three exports `exported` builds
def test_onnxruntime_gives_pytorchs_detections(exported):
    variant, cfg, model, path, result = exported
    assert result.same_detections and result.max_abs_diff['scores'] < 1e-4
    detector = OnnxDetector(path, threads=1)
    images = [make_image(h, w, seed=s) for h, w, s in IMAGES]
    # a fixed batch of 2 runs the images together, as mmdet's batch; else one by one
    want = mmdet_batch_predict(model, cfg, images) if detector.batch_size == 2 else TorchDetector(model, cfg)(images)
    for got, ref in zip(detector(images), want, strict=True):
        assert len(got.scores) > 10
        assert_same_detections(got, ref, score_tol=1e-4, box_tol=2e-2)
    if detector.batch_size == 2:  # an odd number of images: the last batch is filled up, the filler dropped
        got = detector(images + images[:1])
        assert len(got) == 3
        assert_same_detections(got[2], want[0], score_tol=1e-4, box_tol=2e-2)
    if variant.endswith('dynamic'):  # a batch of two sizes, padded to the larger as mmdet pads it
        images = [make_image(40, 100, seed=3), make_image(120, 90, seed=4)]
        assert detector.batch_size is None and detector.fixed_shape is None
        for got, want in zip(detector(images), mmdet_batch_predict(model, cfg, images), strict=True):
            assert_same_detections(got, want, score_tol=1e-4, box_tol=2e-2)


@pytest.mark.slow  # the three exports `exported` builds
def test_the_graph_holds_standard_operators_only(exported):
    variant, cfg, model, path, result = exported
    graph = onnx.load(path)
    domains = {node.domain for node in iter_nodes(graph)}
    assert domains <= {'', 'ai.onnx'} and not graph.functions
    assert {'NonMaxSuppression', 'RoiAlign'} <= set(result.op_types)
    assert ('DeformConv' in result.op_types) == (not variant.startswith('plain'))
    assert max(o.version for o in graph.opset_import if o.domain in ('', 'ai.onnx')) == 19
    graph.graph.node[0].domain = 'com.example'
    with pytest.raises(ValueError, match=r"non-standard operators \['com.example::"):
        check_standard(graph)


@pytest.mark.slow  # the three exports `exported` builds
def test_the_file_carries_classes_input_and_config(exported):
    variant, cfg, model, path, result = exported
    meta = read_metadata(path)
    assert json.loads(meta[META['classes']]) == list(config_classes(cfg))
    assert InputSpec.from_json(meta[META['input']]) == InputSpec.from_config(cfg)
    assert meta[META['config_path']] == VARIANTS[variant][0] and 'DCNResNet' in meta[META['config']]
    shape = json.loads(meta[META['input_shape']])
    assert shape == ([None, 3, None, None] if variant.endswith('dynamic') else [VARIANTS[variant][3], 3, 64, 64])


@pytest.mark.slow  # the three exports `exported` builds
def test_an_image_without_proposals_gives_no_detections(exported):
    variant, cfg, model, path, result = exported
    detector = OnnxDetector(path)
    n = detector.batch_size or 1
    feed = {'images': np.zeros((n, 3, 64, 64), np.float32), 'img_shapes': np.zeros((n, 2), np.float32),
            'scale_factors': np.ones((n, 2), np.float64)}
    boxes, scores, labels, num = detector.session.run(None, feed)  # every proposal clipped to nothing
    assert num.tolist() == [0] * n and not boxes.any() and not scores.any() and (labels == -1).all()
    assert boxes.shape == (n, 2000, 4)


def test_each_deformable_layer_agrees_with_pytorch_to_1e4():
    cfg = tiny_config('shapes_r18_dcnv2.py', image_size=96)
    model = tiny_model(cfg)
    runner = TorchDetector(model, cfg)
    image = make_image(90, 60)
    names = ['backbone.layer4.1.conv2', 'roi_head.bbox_roi_extractor.roi_layers.0']
    result = layer_agreement(model, lambda: runner([image]), names=names)
    assert sorted(result) == names
    for name, r in result.items():
        assert r['rel_err'] < 1e-4 and r['scale'] > 0, (name, r)


def test_refusals(tmp_path):
    cfg = tiny_config('shapes_r18_plain.py')
    model = tiny_model(cfg)
    spec, classes = InputSpec.from_config(cfg), config_classes(cfg)
    with pytest.raises(ValueError, match='opset 18 is too old: ONNX has DeformConv .* only from opset 19'):
        export_onnx(model, spec, str(tmp_path / 'a.onnx'), classes=classes, opset=18)
    (tmp_path / 'b.onnx').write_bytes(b'')
    with pytest.raises(ValueError, match="b.onnx' exists"):
        export_onnx(model, spec, str(tmp_path / 'b.onnx'), classes=classes)
    with pytest.raises(ValueError, match='the model has 3 classes but the config names 2'):
        export_onnx(model, spec, str(tmp_path / 'c.onnx'), classes=('x', 'y'))
    with pytest.raises(ValueError, match='multiples of .*pad_size_divisor.*--shape 128 96'):
        export_onnx(model, spec, str(tmp_path / 'c.onnx'), classes=classes, shape=(100, 96))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['b.onnx']  # nothing written but b.onnx
