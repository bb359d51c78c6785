from .datasets import CocoMaskDataset
from .runner import DCNRunner, EpochSeedHook, ProgressBarHook, WeightsOnlyCheckpointHook

__all__ = ['CocoMaskDataset', 'DCNRunner', 'EpochSeedHook', 'ProgressBarHook', 'WeightsOnlyCheckpointHook']
