# Shared base: mmdet 3.3.0's Cascade Mask R-CNN R50-FPN 1x on COCO 2017 (8 GPUs x 2 images, SGD lr 0.02),
# on dcn_det's DCNResNet with no deformable stage, and ImageNet weights from a local file.
_base_ = ['mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py', './dcn_resnet.py']
model = dict(backbone={{_base_.dcn_backbone}})
optim_wrapper = dict(paramwise_cfg={{_base_.dcn_paramwise_cfg}})
# mmdet's CocoDataset, each instance whose mask is empty skipped and counted (dcn_det/engine/datasets.py)
train_dataloader = dict(dataset=dict(type='CocoMaskDataset'))
