"""Shared test helpers."""
import itertools
import os.path as osp
import subprocess
import sys

import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG_DIR = osp.join(REPO, 'configs')


def tool(*args) -> subprocess.CompletedProcess:
    """Run ``python <args>`` (a tool's path and its arguments) from the repository root, output captured."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True)
# a 3x3 kernel's points (dy, dx) in row-major order, as deformable convs number them
GRID = torch.tensor(list(itertools.product((-1, 0, 1), repeat=2)), dtype=torch.float64)


def shrink_detector(cfg, base_channels: int = 8, num_classes: int = 3, fc: int = 32):
    """Shrink a shipped two-stage config (Faster / Mask / Cascade (Mask) R-CNN) for CPU tests, as mmdet's
    detector tests do.

    Depth, DCN layout and every head type stay as shipped; widths shrink and nothing downloads.
    """
    model = cfg.model
    bb = model.backbone
    bb.base_channels = base_channels
    bb.init_cfg = None
    expansion = 4 if bb.depth >= 50 else 1
    model.neck.in_channels = [base_channels * expansion * 2**i for i in range(4)]
    width = 16
    model.neck.out_channels = width
    model.rpn_head.in_channels = model.rpn_head.feat_channels = width
    roi_head = model.roi_head
    ext = roi_head.bbox_roi_extractor
    ext.out_channels = width
    if 'deform_fc_channels' in ext.roi_layer or ext.roi_layer.type in ('DeformRoIPool', 'ModulatedDeformRoIPool'):
        ext.roi_layer.deform_fc_channels = fc
    heads = roi_head.bbox_head if isinstance(roi_head.bbox_head, list) else [roi_head.bbox_head]  # a cascade's stages
    for head in heads:
        head.in_channels, head.fc_out_channels, head.num_classes = width, fc, num_classes
    if roi_head.get('mask_head') is not None:
        roi_head.mask_roi_extractor.out_channels = width
        mask = roi_head.mask_head
        mask.in_channels, mask.conv_out_channels, mask.num_classes = width, width, num_classes
    return cfg


TINY_SHAPES_CONFIG = """
_base_ = {base!r}
data_root = {data_root!r}
classes = {classes!r}
image_size = {image_size}
metainfo = dict(classes=classes)
model = dict(
    backbone=dict(base_channels=8),
    neck=dict(in_channels=[8, 16, 32, 64], out_channels=16),
    rpn_head=dict(in_channels=16, feat_channels=16),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=16{roi_layer}),
                  bbox_head=dict(in_channels=16, fc_out_channels=32, num_classes=len(classes))))
train_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5), dict(type='PackDetInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
train_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(batch_size=2, dataset=dict(
    data_root=data_root, metainfo=metainfo, pipeline=test_pipeline,
    ann_file='annotations/instances_{val_split}.json', data_prefix=dict(img='{val_split}/')))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_{val_split}.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs={epochs}, val_interval={epochs})
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10)]
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=-1), logger=dict(interval=1))
optim_wrapper = dict(optimizer=dict(lr={lr}))
"""


def write_tiny_shapes_config(path, data_root: str, classes, *, base: str = 'shapes_r18_dcnv2.py',
                             epochs: int = 2, image_size: int = 96, val_split: str = 'val', lr: float = 2e-3,
                             extra: str = '') -> str:
    """A shipped shapes config at 1/4 width on a tiny generated dataset: data_root/classes changed only."""
    text = TINY_SHAPES_CONFIG.format(base=osp.join(CONFIG_DIR, base), data_root=str(data_root).rstrip('/') + '/',
                                     classes=tuple(classes), image_size=image_size, epochs=epochs,
                                     val_split=val_split, lr=lr,
                                     roi_layer=(', roi_layer=dict(deform_fc_channels=32)'
                                                if 'pool' in base or 'dcn' in base else ''))
    with open(path, 'w') as f:
        f.write(text + extra)
    return str(path)
