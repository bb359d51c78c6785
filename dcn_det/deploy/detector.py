"""A tensor-in, tensors-out Faster / Mask R-CNN and Cascade (Mask) R-CNN around an mmdet two-stage detector,
traceable for ONNX export.

mmdet's ``predict`` takes and returns ``DetDataSample`` objects and loops over images in Python;
:class:`DeployableDetector` computes the same detections from three tensors, for a whole batch at
once, with operators that ``torch.onnx.export(..., dynamo=True)`` maps to standard ONNX ops. It owns
no weights: it calls the detector's own backbone, neck, RPN head, RoI extractor layers and bbox head,
so every checkpoint that loads into the detector exports.

Post-processing follows mmdet 3.3 step by step (``RPNHead._predict_by_feat_single``,
``BBoxHead._predict_by_feat_single``, ``multiclass_nms``, mmcv's ``batched_nms``): per-level top
``nms_pre`` RPN scores, ``delta2bbox`` with clipping to the resized image, ``min_bbox_size``, NMS per
level, ``max_per_img`` proposals; RoI level mapping; class-specific decoding, clipping, rescaling to
original pixels (before NMS, as mmdet does), ``score_thr``, class-aware NMS, ``max_per_img``. NMS uses
mmcv's coordinate offset per group (``group * (max_coordinate + 1)``) with torchvision's ``nms``,
which exports to ``NonMaxSuppression``. A group is (image, class) here, so with one image per batch
the boxes that meet in NMS are offset exactly as mmdet offsets them.

A cascade (mmdet's ``CascadeRoIHead._refine_roi`` and ``predict_bbox``) runs its stages in turn: each stage
pools the RoIs with its own extractor; between stages every RoI is moved by that stage's regression for its
best-scoring foreground class (``regress_by_class``, clipped to the resized image); the last stage's regression
decodes the last stage's RoIs, under the mean of the stages' class logits.

A Mask R-CNN's mask head then runs on the detections' boxes in resized-image pixels, as mmdet's
``predict_mask`` does (a cascade's: every stage's mask head, the mean of their probabilities). (mmdet's mask
models run the class-aware NMS on those resized boxes and rescale after; here NMS sees the rescaled ones, as
for Faster R-CNN: IoU is unchanged by a keep-ratio scale up to float rounding.)

Where batching differs from mmdet's loop: proposals of all images are scored together and kept per
image by rank (the same set), and the RoI head sees them in score order, not image order (its output
per RoI does not depend on the order).
"""
import inspect
import math
import re
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .preprocess import InputSpec


class NotExportableError(ValueError):
    """A part of the model that cannot be exported; the message names the layer, why, and the fix."""


class DeployableDetector(nn.Module):
    """Faster R-CNN or Cascade R-CNN (and their Mask variants: with each detection's RoI mask) from pixels to
    detections in original-image pixels, for a batch.

    Args:
        detector (nn.Module): an mmdet ``TwoStageDetector`` with an ``RPNHead`` and a ``StandardRoIHead`` or
            ``CascadeRoIHead`` (boxes, or boxes and ``FCNMaskHead`` s), e.g. a dcn_det Faster / Mask / Cascade
            (Mask) R-CNN config's model; checked by :func:`check_exportable`.
        spec (InputSpec): the normalisation (and padding value) applied inside.

    Inputs and outputs: those of the exported file, stated once in :mod:`dcn_det.deploy.metadata`
    (``INPUTS``, ``OUTPUTS``, and ``MASK_OUTPUTS`` for a mask model; K = ``test_cfg.rcnn.max_per_img``).
    """

    def __init__(self, detector: nn.Module, spec: InputSpec) -> None:
        super().__init__()
        check_exportable(detector)
        self.detector = detector
        self.spec = spec
        # named apart from the exporter's own values ('mean' is one: an ONNX name must be unique)
        for name, value in (('pixel_mean', spec.mean), ('pixel_std', spec.std)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def max_per_img(self) -> int:
        return int(self.detector.roi_head.test_cfg.max_per_img)

    @property
    def with_mask(self) -> bool:
        return bool(self.detector.roi_head.with_mask)

    @property
    def kind(self) -> str:
        """'Faster R-CNN', 'Mask R-CNN', 'Cascade R-CNN' or 'Cascade Mask R-CNN'."""
        if is_cascade(self.detector.roi_head):
            return 'Cascade Mask R-CNN' if self.with_mask else 'Cascade R-CNN'
        return 'Mask R-CNN' if self.with_mask else 'Faster R-CNN'

    def forward(self, images: Tensor, img_shapes: Tensor, scale_factors: Tensor) -> tuple[Tensor, ...]:
        x = self.normalise(images, img_shapes)
        feats = self.detector.extract_feat(x)
        rois = self.proposals(feats, img_shapes)
        return self.detect(feats, rois, img_shapes, scale_factors)

    def normalise(self, images: Tensor, img_shapes: Tensor) -> Tensor:
        """mmdet's ``DetDataPreprocessor``: channel flip, (x - mean) / std, padding set to ``pad_value``."""
        if self.spec.bgr_to_rgb:
            images = images[:, [2, 1, 0]]
        x = (images - self.pixel_mean) / self.pixel_std
        rows = torch.arange(x.shape[2], device=x.device, dtype=img_shapes.dtype)
        cols = torch.arange(x.shape[3], device=x.device, dtype=img_shapes.dtype)
        inside = (rows.view(1, -1, 1) < img_shapes[:, 0].view(-1, 1, 1)) & \
                 (cols.view(1, 1, -1) < img_shapes[:, 1].view(-1, 1, 1))
        return torch.where(inside.unsqueeze(1), x, x.new_tensor(self.spec.pad_value))

    def proposals(self, feats: tuple[Tensor, ...], img_shapes: Tensor) -> Tensor:
        """RPN proposals, ``Tensor[R, 5]`` (batch_index, x1, y1, x2, y2) in resized-image pixels."""
        head = self.detector.rpn_head
        cfg = head.test_cfg
        cls_scores, bbox_preds = head(feats)
        n = feats[0].shape[0]
        priors = head.prior_generator.grid_priors([c.shape[-2:] for c in cls_scores], dtype=feats[0].dtype,
                                                  device=feats[0].device)
        scores, deltas, anchors, levels = [], [], [], []
        for level, (cls, reg, prior) in enumerate(zip(cls_scores, bbox_preds, priors, strict=True)):
            s = cls.permute(0, 2, 3, 1).reshape(n, -1, head.cls_out_channels)
            s = (s.sigmoid() if head.use_sigmoid_cls else s.softmax(-1))[..., 0]
            d = reg.permute(0, 2, 3, 1).reshape(n, -1, 4)
            nms_pre = int(cfg.get('nms_pre', -1))
            # mmdet sorts only a level with more than nms_pre anchors (order decides NMS among equal
            # scores); a level of symbolic size is sorted whatever its size (and cut at nms_pre)
            if nms_pre > 0 and (not isinstance(s.shape[1], int) or nms_pre < s.shape[1]):
                s, idx = s.sort(dim=1, descending=True)
                s, idx = s[:, :nms_pre], idx[:, :nms_pre]
                d = d.gather(1, idx.unsqueeze(-1).expand(-1, -1, 4))
                prior = prior[idx]
            else:
                prior = prior.expand(n, -1, -1)
            scores.append(s)
            deltas.append(d)
            anchors.append(prior)
            levels.append(torch.full((s.shape[1],), level, dtype=torch.long, device=s.device))
        boxes = decode_boxes(head.bbox_coder, torch.cat(anchors, 1), torch.cat(deltas, 1), img_shapes.unsqueeze(1))
        scores = torch.cat(scores, 1).flatten()
        batch = torch.arange(n, device=boxes.device).view(n, 1).expand(n, boxes.shape[1]).flatten()
        groups = batch * len(levels) + torch.cat(levels).repeat(n)
        boxes = boxes.reshape(-1, 4)
        if cfg.get('min_bbox_size', -1) >= 0:
            wh = boxes[:, 2:] - boxes[:, :2]
            valid = ((wh[:, 0] > cfg.min_bbox_size) & (wh[:, 1] > cfg.min_bbox_size)).nonzero().squeeze(1)
            boxes, scores, batch, groups = boxes[valid], scores[valid], batch[valid], groups[valid]
        keep = batched_nms(boxes, scores, groups, float(cfg.nms.iou_threshold))
        keep, _ = top_per_image(keep, batch[keep], n, int(cfg.max_per_img))
        return torch.cat([batch[keep].unsqueeze(1).to(boxes.dtype), boxes[keep]], 1)

    def extract_rois(self, feats: tuple[Tensor, ...], rois: Tensor, extractor: Optional[nn.Module] = None) -> Tensor:
        """mmdet's ``SingleRoIExtractor.forward`` without its data-dependent branch: each RoI goes to one
        level (``map_roi_levels``) and is pooled by that level (``DeformRoIExtractor.pool_level``, else
        the level's ``roi_layers`` entry). ``Tensor[R, C, ph, pw]``.

        As in mmdeploy's rewrite of it, every level also pools two zero-size dummy RoIs (dropped after),
        so that no layer ever runs on an empty set of RoIs in the exported graph. ``extractor``: the box
        head's by default.
        """
        extractor = self.detector.roi_head.bbox_roi_extractor if extractor is None else extractor
        feats = feats[:extractor.num_inputs]
        num_levels = len(feats)
        dummies = 2 * num_levels
        levels = torch.cat([torch.arange(num_levels, device=rois.device).repeat(2),
                            extractor.map_roi_levels(rois, num_levels)])
        rois = torch.cat([rois.new_zeros(dummies, 5), rois])
        # DeformRoIExtractor.pool_level passes its shared offset predictor; mmdet's extractors call the layer
        pool = getattr(extractor, 'pool_level', lambda level, feat, r: extractor.roi_layers[level](feat, r))
        out = feats[0].new_zeros(rois.shape[0], extractor.out_channels, *extractor.roi_layers[0].output_size)
        for level in range(num_levels):
            inds = (levels == level).nonzero().squeeze(1)
            _check_size(inds.shape[0] >= 2)  # the dummies: lets the exporter drop its empty-input cases
            out[inds] = pool(level, feats[level], rois[inds]).to(out.dtype)
        return out[dummies:]

    def detect(self, feats: tuple[Tensor, ...], rois: Tensor, img_shapes: Tensor,
               scale_factors: Tensor) -> tuple[Tensor, ...]:
        """The RoI head (each stage of a cascade) and class-aware NMS; returns the four outputs (five with masks;
        see the class docstring)."""
        roi_head, cfg = self.detector.roi_head, self.detector.roi_head.test_cfg
        stages = list(zip(as_list(roi_head.bbox_roi_extractor), as_list(roi_head.bbox_head), strict=True))
        cls_scores = []
        for stage, (extractor, head) in enumerate(stages):
            x = self.extract_rois(feats, rois, extractor)
            if roi_head.with_shared_head:
                x = roi_head.shared_head(x)
            cls_score, bbox_pred = head(x)
            cls_scores.append(cls_score)
            if stage < len(stages) - 1:
                rois = refine_rois(head, rois, cls_score, bbox_pred, img_shapes)
        if len(cls_scores) > 1:  # as mmdet's cascade: sum() (from 0), then / float(num_stages)
            cls_score = sum(cls_scores) / float(len(cls_scores))
        num_rois, num_classes = rois.shape[0], head.num_classes
        batch = rois[:, 0].long()
        deltas = bbox_pred.view(num_rois, bbox_pred.shape[1] // 4, 4)  # [R, C or 1 (class-agnostic), 4]
        resized = decode_boxes(head.bbox_coder, rois[:, 1:].unsqueeze(1), deltas, img_shapes[batch].unsqueeze(1))
        boxes = resized * (1 / scale_factors[batch]).float().repeat(1, 2).unsqueeze(1)  # back to original pixels
        boxes = boxes.expand(num_rois, num_classes, 4).reshape(-1, 4)
        resized = resized.expand(num_rois, num_classes, 4).reshape(-1, 4)
        scores = F.softmax(cls_score, dim=-1)[:, :num_classes].reshape(-1)
        labels = torch.arange(num_classes, device=scores.device).repeat(num_rois)
        batch = batch.unsqueeze(1).expand(num_rois, num_classes).reshape(-1)  # OpenVINO: not repeat_interleave
        valid = (scores > cfg.score_thr).nonzero().squeeze(1)
        boxes, scores, labels, batch, resized = boxes[valid], scores[valid], labels[valid], batch[valid], resized[valid]
        keep = batched_nms(boxes, scores, batch * num_classes + labels, float(cfg.nms.iou_threshold))
        n, k = scale_factors.shape[0], self.max_per_img
        keep, rank = top_per_image(keep, batch[keep], n, k)
        slot = batch[keep] * k + rank
        out_boxes = boxes.new_zeros(n * k, 4)
        out_scores = scores.new_zeros(n * k)
        out_labels = labels.new_full((n * k,), -1)
        out_boxes[slot] = boxes[keep]
        out_scores[slot] = scores[keep]
        out_labels[slot] = labels[keep]
        num_dets = (batch[keep].unsqueeze(1) == torch.arange(n, device=batch.device)).sum(0)
        outputs = (out_boxes.view(n, k, 4), out_scores.view(n, k), out_labels.view(n, k), num_dets)
        if self.with_mask:
            masks = self.masks(feats, batch[keep], resized[keep], labels[keep])
            out_masks = masks.new_zeros(n * k, *masks.shape[1:])
            out_masks[slot] = masks
            outputs += (out_masks.view(n, k, *masks.shape[1:]),)
        return outputs

    def masks(self, feats: tuple[Tensor, ...], batch: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
        """mmdet's ``StandardRoIHead.predict_mask`` up to the paste: the mask head on the detections' boxes
        (``Tensor[D, 4]`` in resized-image pixels, as mmdet pools them), the sigmoid of each one's class channel:
        ``Tensor[D, M, M]``. A cascade's (``CascadeRoIHead.predict_mask``): every stage's mask head, the mean of
        their sigmoids. A dummy RoI goes first (dropped after), so the heads never run on none."""
        roi_head = self.detector.roi_head
        rois = torch.cat([batch.unsqueeze(1).to(boxes.dtype), boxes], 1)
        rois = torch.cat([rois.new_zeros(1, 5), rois])
        probs = []
        for extractor, head in zip(as_list(roi_head.mask_roi_extractor), as_list(roi_head.mask_head), strict=True):
            preds = head(self.extract_rois(feats, rois, extractor))[1:]
            channel = labels if preds.shape[1] > 1 else torch.zeros_like(labels)  # class_agnostic: one channel
            probs.append(preds[torch.arange(preds.shape[0], device=preds.device), channel].sigmoid())
        return probs[0] if len(probs) == 1 else torch.stack(probs).mean(dim=0)  # mmdet's merge_aug_masks


def is_cascade(roi_head: nn.Module) -> bool:
    """Whether ``roi_head`` is mmdet's ``CascadeRoIHead`` (itself: its subclasses add branches)."""
    from mmdet.models.roi_heads import CascadeRoIHead

    return type(roi_head) is CascadeRoIHead


def as_list(module: nn.Module) -> list[nn.Module]:
    """A cascade's per-stage ``nn.ModuleList`` as a list; a single module as a list of one."""
    return list(module) if isinstance(module, nn.ModuleList) else [module]


def refine_rois(head: nn.Module, rois: Tensor, cls_score: Tensor, bbox_pred: Tensor, img_shapes: Tensor) -> Tensor:
    """mmdet's ``BBoxHead.regress_by_class`` as ``CascadeRoIHead._refine_roi`` calls it between stages: each RoI
    (``Tensor[R, 5]``) moved by its regression for the best-scoring foreground class of ``cls_score`` (logits,
    background last), decoded by ``head``'s coder and clipped to its image (``img_shapes``, ``Tensor[N, 2]``)."""
    num_rois = rois.shape[0]
    batch = rois[:, 0].long()
    deltas = bbox_pred.view(num_rois, -1, 4)  # [R, C or 1 (class-agnostic), 4]
    if deltas.shape[1] > 1:
        labels = cls_score[:, :-1].argmax(dim=1)
        deltas = deltas[torch.arange(num_rois, device=rois.device), labels]
    else:
        deltas = deltas[:, 0]
    boxes = decode_boxes(head.bbox_coder, rois[:, 1:], deltas, img_shapes[batch])
    return torch.cat([rois[:, :1], boxes], 1)


def decode_boxes(coder: nn.Module, rois: Tensor, deltas: Tensor, max_shape: Tensor) -> Tensor:
    """mmdet's ``delta2bbox`` for ``DeltaXYWHBBoxCoder``, with shapes broadcast instead of repeated.

    rois (Tensor[..., 4]) and deltas (Tensor[..., 4]) broadcast together; max_shape (Tensor[..., 2]) is
    each box's image (h, w), broadcastable likewise. Same arithmetic, in the same order, as mmdet's.
    """
    means, stds = deltas.new_tensor(coder.means), deltas.new_tensor(coder.stds)
    denorm = deltas * stds + means
    dxy, dwh = denorm[..., :2], denorm[..., 2:]
    pxy = (rois[..., :2] + rois[..., 2:]) * 0.5
    pwh = rois[..., 2:] - rois[..., :2]
    dxy_wh = pwh * dxy
    # the heads call decode() without wh_ratio_clip: its default applies
    max_ratio = abs(math.log(inspect.signature(type(coder).decode).parameters['wh_ratio_clip'].default))
    if coder.add_ctr_clamp:
        dxy_wh = torch.clamp(dxy_wh, max=coder.ctr_clamp, min=-coder.ctr_clamp)
        dwh = torch.clamp(dwh, max=max_ratio)
    else:
        dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + dxy_wh
    gwh = pwh * dwh.exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if coder.clip_border:
        wh = max_shape.flip(-1)
        boxes = torch.minimum(boxes.clamp(min=0), torch.cat([wh, wh], -1))
    return boxes


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """mmcv's ``batched_nms``: NMS within each group, via one offset per group. Indices, by falling score.

    Boxes of equal score are visited in the order of torch's (unstable) descending sort, as mmcv's NMS
    kernel visits them: torchvision's kernel sorts stably, so it is handed them in that order.
    """
    order = scores.sort(descending=True)[1]
    boxes, scores, groups = boxes[order], scores[order], groups[order]
    max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = groups.to(boxes) * (max_coordinate + 1)
    keep = torchvision.ops.nms(boxes + offsets.unsqueeze(1), scores, iou_threshold)
    # tells the exporter what nms's data-dependent size is bounded by (it assumes any int64 otherwise)
    _check_size(keep.shape[0] <= boxes.shape[0])
    return order[keep]


def _check_size(condition) -> None:
    """``torch._check`` on a size, for ``torch.export``; skipped under ``torch.jit.trace`` (the OpenVINO
    converter's tracer), where sizes are tensors that ``torch._check`` refuses."""
    if not torch.jit.is_tracing():
        torch._check(condition)


def top_per_image(keep: Tensor, batch: Tensor, num_images: int, k: int) -> tuple[Tensor, Tensor]:
    """The first ``k`` of ``keep`` (sorted by falling score) for each image, and their rank in it."""
    onehot = (batch.unsqueeze(1) == torch.arange(num_images, device=batch.device)).long()
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1
    first = (rank < k).nonzero().squeeze(1)
    return keep[first], rank[first]


# ----------------------------------------------------------------------------------------------
# what can be exported, and the switch to exportable kernels


def check_exportable(detector: nn.Module) -> None:
    """Raise :class:`NotExportableError` naming the first part of ``detector`` that cannot be exported."""
    from mmcv.ops import RoIAlign
    from mmdet.models.dense_heads import RPNHead
    from mmdet.models.roi_heads import StandardRoIHead
    from mmdet.models.roi_heads.bbox_heads import BBoxHead
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead
    from mmdet.models.task_modules import AnchorGenerator, DeltaXYWHBBoxCoder

    def refuse(where: str, module: Optional[nn.Module], why: str) -> None:
        kind = f' ({type(module).__name__})' if module is not None else ''
        raise NotExportableError(f'cannot export {where}{kind}: {why}')

    for part in ('backbone', 'rpn_head', 'roi_head'):
        if getattr(detector, part, None) is None:
            refuse('the model', detector, f'it has no {part}; only two-stage detectors with an RPN '
                   '(Faster / Mask / Cascade (Mask) R-CNN) are exported')
    rpn, roi_head = detector.rpn_head, detector.roi_head
    if not isinstance(rpn, RPNHead):
        refuse('model.rpn_head', rpn, 'only mmdet RPNHead is exported')
    if type(rpn.prior_generator) is not AnchorGenerator:
        refuse('model.rpn_head.prior_generator', rpn.prior_generator, 'only AnchorGenerator is exported')
    if not (isinstance(roi_head, StandardRoIHead) or is_cascade(roi_head)):
        refuse('model.roi_head', roi_head, 'only StandardRoIHead (Faster / Mask R-CNN) and CascadeRoIHead (Cascade '
               '(Mask) R-CNN) are exported')
    cascade = is_cascade(roi_head)

    def named(part: str) -> list[tuple[str, nn.Module]]:  # model.roi_head.<part>, or .<part>.<stage> of a cascade
        modules = as_list(getattr(roi_head, part))
        return [(f'model.roi_head.{part}' + (f'.{i}' if cascade else ''), m) for i, m in enumerate(modules)]

    if roi_head.with_mask:
        for where, mask_head in named('mask_head'):
            if not isinstance(mask_head, FCNMaskHead):
                refuse(where, mask_head, 'only FCNMaskHead (Mask R-CNN) is exported')
    coders = [('model.rpn_head.bbox_coder', rpn.bbox_coder)]
    for where, head in named('bbox_head'):
        if not isinstance(head, BBoxHead) or head.custom_cls_channels or head.custom_activation:
            refuse(where, head, 'only BBoxHead with a softmax classifier is exported')
        coders.append((f'{where}.bbox_coder', head.bbox_coder))
    for where, coder in coders:
        if not isinstance(coder, DeltaXYWHBBoxCoder):
            refuse(where, coder, 'only DeltaXYWHBBoxCoder is exported')
    for where, cfg in (('model.test_cfg.rpn', rpn.test_cfg), ('model.test_cfg.rcnn', roi_head.test_cfg)):
        if cfg is None or cfg.get('nms', {}).get('type', 'nms') != 'nms':
            refuse(where, None, f"needs nms=dict(type='nms', iou_threshold=...), got {cfg and cfg.get('nms')}")
    for name, module in detector.named_modules():
        if isinstance(module, RoIAlign):
            if module.pool_mode != 'avg':
                refuse(name, module, "pool_mode='max' has no torchvision (hence ONNX) equivalent; use 'avg'")
        elif _is_from(module, 'mmcv.ops') and not _is_from(module, 'dcn_det'):
            refuse(name, module, f"mmcv's compiled op cannot be traced by the exporter; {_fix_for(module)}")


def _is_from(module: nn.Module, package: str) -> bool:
    return type(module).__module__.split('.')[0] == package.split('.')[0] and \
        type(module).__module__.startswith(package)


def _fix_for(module: nn.Module) -> str:
    from dcn_det.models.convert import mmcv_ops_report

    if mmcv_ops_report(module).mmcv:
        return "convert the model first with dcn_det.convert_mmcv_ops(model) (same weights and keys)"
    return 'replace it with a layer built from torch or torchvision ops'


def exportable_layers(detector: nn.Module) -> dict[str, nn.Module]:
    """dcn_det's deformable layers (modules of dcn_det with a ``backend``) and mmcv's RoIAlign layers."""
    from mmcv.ops import RoIAlign

    return {name: m for name, m in detector.named_modules()
            if (_is_from(m, 'dcn_det') and hasattr(m, 'backend')) or isinstance(m, RoIAlign)}


@contextmanager
def export_kernels(detector: nn.Module) -> Iterator[None]:
    """Run every deformable layer on torchvision's kernels (``backend='torchvision'``) and mmcv's RoIAlign
    on torchvision's ``roi_align`` while inside; restored on exit.

    torchvision's ``deform_conv2d`` exports to ONNX ``DeformConv`` (opset 19) and ``roi_align`` to
    ``RoiAlign`` (opset 16); dcn_det's deformable RoI pooling computes each bin as a ``roi_align`` in
    that backend, so it exports to ``RoiAlign`` too, with the same sampling rule.
    """
    saved = []
    try:
        for module in exportable_layers(detector).values():
            if hasattr(module, 'backend'):
                saved.append((module, 'backend', module.backend))
                module.backend = 'torchvision'
            else:
                saved.append((module, 'use_torchvision', module.use_torchvision))
                module.use_torchvision = True
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


@contextmanager
def name_failing_layer(detector: nn.Module, action: str) -> Iterator[None]:
    """Turn an exception raised inside a submodule into a :class:`NotExportableError` that names the
    innermost submodule running at the time, and the exception's first line."""
    names = {id(m): name for name, m in detector.named_modules() if name}
    stack: list[nn.Module] = []

    def enter(module, args):
        if id(module) in names:
            stack.append(module)

    def leave(module, args, output):
        if stack and stack[-1] is module:
            stack.pop()

    handles = [nn.modules.module.register_module_forward_pre_hook(enter),
               nn.modules.module.register_module_forward_hook(leave)]
    try:
        yield
    except NotExportableError:
        raise
    except Exception as e:
        root = e
        while root.__cause__ is not None:  # the exporter wraps the error that says why
            root = root.__cause__
        lines = [re.sub(r'\x1b\[[0-9;]*m', '', line).strip() for line in str(root).splitlines()]
        lines = [line for line in lines if line]
        why = f'{type(root).__name__}: {lines[0] if lines else ""}'[:400]
        if stack:
            raise NotExportableError(f'cannot {action} {names[id(stack[-1])]} ({type(stack[-1]).__name__}): '
                                     f'{why}') from e
        raise NotExportableError(f'cannot {action} the model: {why}') from e
    finally:
        for handle in handles:
            handle.remove()
