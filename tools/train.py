"""Train a detector: ``python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]``.

mmdet's ``tools/train.py`` with dcn_det's checks: outputs go to ``work_dirs/<config name>/``; a work
dir that already holds checkpoints is not trained into again unless ``--resume`` says so; multi-GPU
and multi-node runs go through ``tools/dist_train.sh`` (torchrun) or ``--launcher slurm``.

Any mmdet config works, mmdet's model zoo included: mmcv's deformable layers are converted to dcn_det's
kernels (:func:`dcn_det.convert_mmcv_ops`: same weights and checkpoint keys); ``--keep-mmcv-ops`` keeps mmcv's.
"""
import argparse
import glob
import os.path as osp

from dcn_det.checkpoint import CheckpointLoadError, load_checkpoint_file
from dcn_det.cli import (
    DictAction,
    UsageError,
    add_kernel_switch,
    build_runner,
    check_data,
    choose_kernels,
    fail,
    load_config,
    set_local_rank,
)

# mmengine's AmpOptimWrapper asserts one of these deep inside the runner; elsewhere --amp is refused up front.
# bfloat16 autocast on a CPU is no substitute: over the whole forward it dies in mmcv's CPU NMS on the RPN
# proposals ("expected scalar type Float but found BFloat16"), and over backbone + neck only it was not faster
# (docs/speed.md), as the deformable ops compute in float32 inside.
AMP_DEVICES = ('cuda', 'npu', 'mlu', 'musa')
CPU_AMP = ("--amp needs a GPU (mmengine's AmpOptimWrapper: CUDA, NPU, MLU or MUSA); bfloat16 autocast on a CPU "
           "breaks mmcv's CPU NMS and was not faster where it ran (see tools/train.py): train without --amp")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default work_dirs/<config name>)')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision (CUDA only)')
    parser.add_argument('--auto-scale-lr', action='store_true', help='scale the lr to the total batch size')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from CKPT, or from the latest checkpoint of the work dir if no CKPT')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (mmengine syntax)')
    add_kernel_switch(parser)
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    from mmengine.device import get_device

    args = parse_args(argv)
    set_local_rank(args.local_rank)
    try:
        if args.amp and get_device() not in AMP_DEVICES:
            raise UsageError(CPU_AMP)
        cfg = load_config(args.config, args.cfg_options, args.work_dir)
        choose_kernels(cfg, args.keep_mmcv_ops)
        check_data(cfg, 'train')
        cfg.launcher = args.launcher
        if args.amp:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
        if args.auto_scale_lr:
            if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
                raise UsageError('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
            cfg.auto_scale_lr.enable = True
        existing = sorted(glob.glob(osp.join(cfg.work_dir, '*.pth')))
        if args.resume is None and existing:
            raise UsageError(f'{cfg.work_dir} already holds checkpoints ({osp.basename(existing[-1])}, ...): '
                             'pass --resume to continue that run, or choose another --work-dir')
        if args.resume == 'auto':
            cfg.resume, cfg.load_from = True, None
        elif args.resume is not None:
            load_checkpoint_file(args.resume)  # a clear error now rather than deep inside the runner
            cfg.resume, cfg.load_from = True, args.resume
        runner = build_runner(cfg)
    except (UsageError, CheckpointLoadError) as e:
        fail(str(e))
    runner.train()


if __name__ == '__main__':
    main()
