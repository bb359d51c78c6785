"""mmengine's Runner, writing checkpoints that are weights-only loadable and never half-written."""
import os
import os.path as osp
import random

import numpy as np
import torch
from mmdet.registry import HOOKS, RUNNERS
from mmengine.dist import is_distributed, master_only
from mmengine.hooks import Hook
from mmengine.model import MMDistributedDataParallel
from mmengine.runner import Runner

from dcn_det.checkpoint import from_weights_only, to_weights_only


@HOOKS.register_module()
class WeightsOnlyCheckpointHook(Hook):
    """Store the message hub (HistoryBuffers of numpy arrays) as tensors, and restore it on load.

    Without it a Runner checkpoint needs ``torch.load(weights_only=False)``; see
    :mod:`dcn_det.checkpoint`.
    """

    priority = 'VERY_LOW'  # after every other hook has added its state

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        for key in list(checkpoint):
            if key != 'state_dict':  # tensors already; skip the largest part
                checkpoint[key] = to_weights_only(checkpoint[key])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if 'message_hub' in checkpoint:
            checkpoint['message_hub'] = from_weights_only(checkpoint['message_hub'])


@HOOKS.register_module()
class EpochSeedHook(Hook):
    """Reseed python, numpy and torch at the start of every epoch from (seed, epoch, rank).

    Training then depends only on the state at the epoch boundary, which the epoch checkpoint
    holds: a run killed mid-way and resumed ends with the same weights as an uninterrupted one
    (the samplers already seed their shuffles by epoch; this covers augmentation and RoI sampling).
    """

    priority = 'VERY_HIGH'

    def before_train_epoch(self, runner) -> None:
        seed = (runner.seed + 1_000_003 * runner.epoch + 7919 * runner.rank) % 2**32
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


@RUNNERS.register_module()
class DCNRunner(Runner):
    """``Runner`` + weights-only, atomic, exactly resumable checkpoints + multi-process CPU runs.

    A checkpoint is written to ``<name>.tmp`` and renamed, so a run killed while saving leaves the
    previous checkpoint and no truncated file; ``--resume`` then picks up the last complete one and,
    with :class:`EpochSeedHook`, ends where the uninterrupted run would have.

    On a machine without CUDA, ``--launcher pytorch`` (torchrun) trains with gloo: mmengine 0.10.7's
    launcher calls ``torch.cuda.set_device`` and wraps DDP with ``device_ids=[LOCAL_RANK]``, both
    of which fail on CPU, so here the process group is initialised from torchrun's environment and
    DDP gets no device ids. With CUDA everything is mmengine's own path.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_hook(WeightsOnlyCheckpointHook())
        self.register_hook(EpochSeedHook())

    def setup_env(self, env_cfg: dict) -> None:
        if self.distributed and not is_distributed() and not torch.cuda.is_available():
            torch.distributed.init_process_group(backend='gloo')
        super().setup_env(env_cfg)

    def wrap_model(self, model_wrapper_cfg, model):
        if self.distributed and not torch.cuda.is_available():
            return MMDistributedDataParallel(
                module=model, device_ids=None, broadcast_buffers=False,
                find_unused_parameters=self.cfg.get('find_unused_parameters', False))
        return super().wrap_model(model_wrapper_cfg, model)

    @master_only  # as Runner.save_checkpoint: the other ranks write nothing
    def save_checkpoint(self, out_dir: str, filename: str, *args, **kwargs) -> None:
        tmp = f'{filename}.tmp'
        super().save_checkpoint(out_dir, tmp, *args, **kwargs)
        os.replace(osp.join(out_dir, tmp), osp.join(out_dir, filename))


@HOOKS.register_module()
class ProgressBarHook(Hook):
    """A progress bar over the test/val loop (the logger prints only every 50 iterations)."""

    priority = 'LOW'

    def _start(self, runner, loader) -> None:
        from mmengine.utils import ProgressBar

        self._bar = ProgressBar(len(loader.dataset)) if runner.rank == 0 else None

    def _step(self, runner, data_batch) -> None:
        if self._bar is not None:
            for _ in range(len(data_batch['inputs'])):
                self._bar.update()

    def before_test_epoch(self, runner) -> None:
        self._start(runner, runner.test_dataloader)

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._step(runner, data_batch)

    def after_test_epoch(self, runner, metrics=None) -> None:
        if self._bar is not None:
            self._bar.file.write('\n')
