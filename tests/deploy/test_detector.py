"""DeployableDetector computes mmdet's detections, for every shipped config, before any export."""
import glob
import os.path as osp

import numpy as np
import pytest
import torch

from dcn_det.deploy import (
    DeployableDetector,
    InputSpec,
    NotExportableError,
    TorchDetector,
    check_exportable,
    export_kernels,
    make_batch,
    prepare,
)
from dcn_det.deploy.detector import decode_boxes, exportable_layers
from tests._helpers import CONFIG_DIR
from tests.deploy._models import (
    NO_CUTOFF,
    assert_same_detections,
    make_image,
    mmdet_batch_predict,
    tiny_config,
    tiny_model,
)

SHIPPED = sorted(osp.basename(p) for p in glob.glob(osp.join(CONFIG_DIR, '*.py')))


def wrapper_outputs(wrapper, spec, images):
    prepared = [prepare(image, spec) for image in images]
    feed = make_batch([p.image for p in prepared], [p.scale_factor for p in prepared], spec)
    with torch.no_grad():
        boxes, scores, labels, num, *_ = wrapper(*(torch.from_numpy(feed[k]) for k in ('images', 'img_shapes',
                                                                                        'scale_factors')))
    return [(boxes[i, :num[i]].numpy(), scores[i, :num[i]].numpy(), labels[i, :num[i]].numpy())
            for i in range(len(images))]


@pytest.mark.parametrize('name', SHIPPED)
def test_matches_mmdet_predict_for_every_shipped_config(name):
    cfg = tiny_config(name, **NO_CUTOFF)
    model = tiny_model(cfg)
    spec = InputSpec.from_config(cfg)
    wrapper = DeployableDetector(model, spec).eval()
    images = [make_image(90, 60, seed=2)]
    reference = TorchDetector(model, cfg)(images)
    for (boxes, scores, labels), ref in zip(wrapper_outputs(wrapper, spec, images), reference, strict=True):
        assert len(scores) > 10
        assert_same_detections((boxes, scores, labels), ref, score_tol=1e-6, box_tol=1e-3)
    # the kernels the export uses give the same detections (to float rounding)
    with export_kernels(model):
        for got, ref in zip(wrapper_outputs(wrapper, spec, images), reference, strict=True):
            assert_same_detections(got, ref, score_tol=1e-5, box_tol=1e-2)


def test_a_batch_of_different_sizes_matches_mmdets_batch():
    cfg = tiny_config('shapes_r18_dcnv2.py', image_size=96, **NO_CUTOFF)
    cfg.model.roi_head.bbox_roi_extractor.share_offset_predictor = False
    model = tiny_model(cfg, seed=1)
    spec = InputSpec.from_config(cfg)
    images = [make_image(50, 96, seed=3), make_image(96, 40, seed=4), make_image(70, 70, seed=5)]
    got = wrapper_outputs(DeployableDetector(model, spec).eval(), spec, images)
    for mine, ref in zip(got, mmdet_batch_predict(model, cfg, images), strict=True):
        assert_same_detections(mine, ref, score_tol=1e-6, box_tol=1e-3)


def test_outputs_are_padded_to_max_per_img_and_sorted_per_image():
    cfg = tiny_config('shapes_r18_mdpool.py', max_per_img=7)
    model = tiny_model(cfg)
    spec = InputSpec.from_config(cfg)
    feed = make_batch([prepare(make_image(60, 60, seed=s), spec).image for s in (1, 2)], [(1.0, 1.0)] * 2, spec)
    with torch.no_grad():
        boxes, scores, labels, num = DeployableDetector(model, spec)(
            *(torch.from_numpy(feed[k]) for k in ('images', 'img_shapes', 'scale_factors')))
    assert boxes.shape == (2, 7, 4) and scores.shape == labels.shape == (2, 7) and num.tolist() == [7, 7]
    assert labels.dtype == num.dtype == torch.int64
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    assert ((boxes[..., 2:] >= boxes[..., :2]).all() and (boxes >= 0).all() and (boxes[..., 2] <= 64).all())


def test_decode_boxes_is_mmdets_delta2bbox():
    from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder

    coder = DeltaXYWHBBoxCoder(target_means=(0.1, 0, 0, -0.1), target_stds=(0.1, 0.1, 0.2, 0.2))
    g = torch.Generator().manual_seed(0)
    rois = torch.rand(20, 2, generator=g) * 50
    rois = torch.cat([rois, rois + torch.rand(20, 2, generator=g) * 30 + 1], 1)
    deltas = torch.randn(20, 3 * 4, generator=g) * 2  # 3 classes, extreme enough to be clipped
    want = coder.decode(rois, deltas.view(-1, 4).view(20, 12), max_shape=(40, 60)).view(20, 3, 4)
    got = decode_boxes(coder, rois.unsqueeze(1), deltas.view(20, 3, 4), torch.tensor([[[40.0, 60.0]]]))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_export_kernels_switches_every_deformable_layer_and_restores_it():
    cfg = tiny_config('faster_rcnn_dcnv1.py')
    model = tiny_model(cfg)
    layers = exportable_layers(model)
    kinds = sorted({type(m).__name__ for m in layers.values()})
    assert kinds == ['DeformConv2dPack', 'DeformRoIPool']
    before = {name: m.backend for name, m in layers.items()}
    with export_kernels(model):
        assert {m.backend for m in layers.values()} == {'torchvision'}
    assert {name: m.backend for name, m in layers.items()} == before
    plain = tiny_model(tiny_config('faster_rcnn_r50_fpn.py'))
    aligns = exportable_layers(plain)
    assert len(aligns) == 4 and not any(m.use_torchvision for m in aligns.values())
    with export_kernels(plain):
        assert all(m.use_torchvision for m in aligns.values())
    assert not any(m.use_torchvision for m in aligns.values())


def test_a_layer_that_cannot_be_exported_is_named_with_the_fix():
    cfg = tiny_config('faster_rcnn_mdconv.py')
    # mmdet's own ResNet builds mmcv's compiled DCNv2 layer, which no exporter can trace
    cfg.model.backbone.type = 'mmdet.ResNet'
    cfg.model.backbone.dcn = dict(type='DCNv2', deform_groups=1, fallback_on_stride=False)
    with pytest.raises(NotExportableError, match=r"^cannot export backbone\.layer2\.0\.conv2 "
                                                 r"\(ModulatedDeformConv2dPack\): mmcv's compiled op .*convert the "
                                                 r"model first with dcn_det\.convert_mmcv_ops\(model\)"):
        check_exportable(tiny_model(cfg))
    cfg = tiny_config('faster_rcnn_r50_fpn.py')
    cfg.model.test_cfg.rcnn.nms = dict(type='soft_nms', iou_threshold=0.5)
    with pytest.raises(NotExportableError, match=r"^cannot export model.test_cfg.rcnn: needs nms=dict\(type='nms'"):
        check_exportable(tiny_model(cfg))
    cfg = tiny_config('faster_rcnn_r50_fpn.py')
    cfg.model.roi_head.bbox_roi_extractor.roi_layer.pool_mode = 'max'
    with pytest.raises(NotExportableError, match=r"roi_layers\.0 \(RoIAlign\): pool_mode='max'"):
        check_exportable(tiny_model(cfg))


def test_only_mmdets_own_cascade_head_is_exported():
    from mmdet.models.roi_heads import CascadeRoIHead

    class WithMoreBranches(CascadeRoIHead):  # as HTC or SCNet: a cascade whose predict does more
        pass

    model = tiny_model(tiny_config('cascade_rcnn_dcnv2.py'))
    check_exportable(model)
    model.roi_head.__class__ = WithMoreBranches
    with pytest.raises(NotExportableError, match=r'^cannot export model.roi_head \(WithMoreBranches\): only '
                                                 r'StandardRoIHead .* and CascadeRoIHead .* are exported'):
        check_exportable(model)
    model.roi_head.__class__ = CascadeRoIHead
    model.roi_head.bbox_head[1].loss_cls.custom_activation = True
    with pytest.raises(NotExportableError, match=r'^cannot export model.roi_head.bbox_head.1 \(Shared2FCBBoxHead\)'):
        check_exportable(model)


def test_assert_same_detections_can_fail():
    boxes, scores, labels = np.array([[0, 0, 10, 10]], np.float32), np.array([0.5], np.float32), np.array([1])
    with pytest.raises(AssertionError):
        assert_same_detections((boxes, scores, labels), (boxes, scores, labels + 1))
    with pytest.raises(AssertionError):
        assert_same_detections((boxes, scores, labels), (boxes + 1, scores, labels))
    with pytest.raises(AssertionError):
        assert_same_detections((boxes, scores, labels), (boxes[:0], scores[:0], labels[:0]))
