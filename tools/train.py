"""Train a detector: ``python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]``.

mmdet's ``tools/train.py`` with dcn_det's checks: outputs go to ``work_dirs/<config name>/``; a work
dir that already holds checkpoints is not trained into again unless ``--resume`` says so; multi-GPU
and multi-node runs go through ``tools/dist_train.sh`` (torchrun) or ``--launcher slurm``.

``--amp``: float16 mixed precision on a GPU (mmengine's ``AmpOptimWrapper``); on a CPU with native
bfloat16 (AVX512-BF16 or AMX) bfloat16 autocast, NMS, RoI pooling, box coding and losses kept in float32
(``CPUAmpOptimWrapper``, :mod:`dcn_det.models.amp`); refused on a CPU without.

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
    add_amp_switch,
    add_kernel_switch,
    build_runner,
    check_data,
    choose_kernels,
    fail,
    load_config,
    set_amp,
    set_local_rank,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default work_dirs/<config name>)')
    add_amp_switch(parser, 'train')
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
    args = parse_args(argv)
    set_local_rank(args.local_rank)
    try:
        cfg = load_config(args.config, args.cfg_options, args.work_dir)
        choose_kernels(cfg, args.keep_mmcv_ops)
        check_data(cfg, 'train')
        cfg.launcher = args.launcher
        if args.amp:
            set_amp(cfg, 'train')
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
