# Shared base: mmdet 3.3.0's Faster R-CNN R50-FPN 1x on COCO 2017 (8 GPUs x 2 images, SGD lr 0.02),
# on dcn_det's DCNResNet with no deformable stage, and ImageNet weights from a local file.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['dcn_det'], allow_failed_imports=False)
runner_type = 'DCNRunner'  # weights-only-safe, atomically written checkpoints

# torchvision's ImageNet ResNet-50, converted once (README, "Pretrained weights"): nothing downloads.
pretrained = 'data/pretrained/resnet50_torchvision.pth'
model = dict(
    backbone=dict(
        type='DCNResNet',
        dcn=None,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))

# DCNv2 paper: offset and mask predictors learn at 0.1x the base lr. dcn_offset_lr_mult covers the
# convs' conv_offset; custom_keys the RoI pooling fc stacks. A no-op for models without them.
optim_wrapper = dict(
    paramwise_cfg=dict(
        dcn_offset_lr_mult=0.1,
        custom_keys={'offset_fc': dict(lr_mult=0.1), 'mask_fc': dict(lr_mult=0.1)}))
