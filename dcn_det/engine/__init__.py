from .runner import DCNRunner, EpochSeedHook, ProgressBarHook, WeightsOnlyCheckpointHook

__all__ = ['DCNRunner', 'EpochSeedHook', 'ProgressBarHook', 'WeightsOnlyCheckpointHook']
