# What every dcn_det COCO base adds to one of mmdet's own 1x configs: dcn_det's registry entries, its runner, and
# DCNResNet (no deformable stage yet) on ImageNet weights from a local file. A base lists this file beside mmdet's
# config and sets `model = dict(backbone={{_base_.dcn_backbone}})`, `optim_wrapper = dict(paramwise_cfg=
# {{_base_.dcn_paramwise_cfg}})`: mmengine refuses two bases that both set `model`.
custom_imports = dict(imports=['dcn_det'], allow_failed_imports=False)
runner_type = 'DCNRunner'  # weights-only-safe, atomically written checkpoints

# torchvision's ImageNet ResNet-50, converted once (README, "Pretrained weights"): nothing downloads.
pretrained = 'data/pretrained/resnet50_torchvision.pth'
dcn_backbone = dict(type='DCNResNet', dcn=None, init_cfg=dict(type='Pretrained', checkpoint=pretrained))

# DCNv2 paper: offset and mask predictors learn at 0.1x the base lr. dcn_offset_lr_mult covers the
# convs' conv_offset; custom_keys the RoI pooling fc stacks. A no-op for models without them.
dcn_paramwise_cfg = dict(
    dcn_offset_lr_mult=0.1,
    custom_keys={'offset_fc': dict(lr_mult=0.1), 'mask_fc': dict(lr_mult=0.1)})
