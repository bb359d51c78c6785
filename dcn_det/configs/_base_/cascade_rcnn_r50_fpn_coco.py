# Shared base: mmdet 3.3.0's Cascade R-CNN R50-FPN 1x on COCO 2017 (8 GPUs x 2 images, SGD lr 0.02),
# on dcn_det's DCNResNet with no deformable stage, and ImageNet weights from a local file.
_base_ = ['mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py', './dcn_resnet.py']
model = dict(backbone={{_base_.dcn_backbone}})
optim_wrapper = dict(paramwise_cfg={{_base_.dcn_paramwise_cfg}})
