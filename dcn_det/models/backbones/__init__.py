from .dcn_resnet import DCN_LAYERS, DCNBasicBlock, DCNBottleneck, DCNResNet

__all__ = ['DCN_LAYERS', 'DCNBasicBlock', 'DCNBottleneck', 'DCNResNet']
