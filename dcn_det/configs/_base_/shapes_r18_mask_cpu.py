# The mask demo: the shapes demo (./shapes_r18_cpu.py) as a Mask R-CNN, trained on each shape's visible-pixel mask
# and evaluated by COCO box and mask AP. The delta is mmdet 3.3.0's own, mask-rcnn_r50_fpn.py over
# faster-rcnn_r50_fpn.py (and coco_instance.py over coco_detection.py), at the demo's widths.
_base_ = ['./shapes_r18_cpu.py']

model = dict(
    type='MaskRCNN',
    data_preprocessor=dict(pad_mask=True),
    roi_head=dict(
        # plain RoIAlign in the plain and DCN demos alike, as mmdet's DCN Mask R-CNNs (why: mask_rcnn_dcnv2.py)
        mask_roi_extractor=dict(
            type='SingleRoIExtractor', roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=0),
            out_channels=64, featmap_strides=[4, 8, 16, 32]),
        mask_head=dict(
            type='FCNMaskHead', num_convs=4, in_channels=64, conv_out_channels=64,
            num_classes={{_base_.model.roi_head.bbox_head.num_classes}},
            loss_mask=dict(type='CrossEntropyLoss', use_mask=True, loss_weight=1.0))),
    train_cfg=dict(rcnn=dict(assigner=dict(match_low_quality=True), mask_size=28)),
    test_cfg=dict(rcnn=dict(mask_thr_binary=0.5)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=({{_base_.image_size}}, {{_base_.image_size}}), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
# mmdet's CocoDataset, each instance whose mask is empty skipped and counted (dcn_det/engine/datasets.py)
train_dataloader = dict(dataset=dict(type='CocoMaskDataset', pipeline=train_pipeline))
val_evaluator = dict(metric=['bbox', 'segm'])
test_evaluator = val_evaluator
