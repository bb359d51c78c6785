# cascade_rcnn_dcnv2.py on ResNet-101.
_base_ = './cascade_rcnn_dcnv2.py'
pretrained = 'data/pretrained/resnet101_torchvision.pth'
model = dict(backbone=dict(depth=101, init_cfg=dict(checkpoint=pretrained)))
