"""Evaluate a checkpoint: ``python tools/test.py CONFIG CHECKPOINT`` -> COCO bbox (and mask) mAP (pycocotools).

mmdet's ``tools/test.py`` with dcn_det's checks. The checkpoint is loaded with
``torch.load(weights_only=True)`` (checkpoints written by dcn_det always are) and strictly: one that
belongs to another model is refused with the keys that differ. ``--trust-checkpoint`` loads a foreign
checkpoint that pickles Python objects (it can run code: only for files you trust). The AP table (box AP, and
mask AP for a mask config, whose evaluator asks for ``segm``) is
printed and written to ``<work_dir>/test_metrics.json``; ``--show-dir`` paints detections; ``--out``
dumps raw predictions (.pkl).

``--onnx MODEL.onnx`` evaluates a file written by ``tools/export_onnx.py`` in onnxruntime instead, on the
same dataloader, metrics, hooks and metrics file (which then names the ONNX file). It is refused, both
sides named, unless its classes, input preparation and source checkpoint are CONFIG's and CHECKPOINT's.
``--openvino MODEL.xml`` does the same for an IR written by ``tools/export_openvino.py``, in OpenVINO,
at ``--precision f32`` (default) or ``bf16``.

``--amp`` tests in mixed precision (bfloat16 on a CPU with native bfloat16, as ``tools/train.py --amp``).

mmcv's deformable layers (mmdet zoo configs) run on dcn_det's kernels (:func:`dcn_det.convert_mmcv_ops`, same
checkpoint keys); ``--keep-mmcv-ops`` keeps mmcv's.
"""
import argparse
import json
import os.path as osp

from dcn_det.checkpoint import CheckpointLoadError, load_checkpoint_file, load_state_dict_strict
from dcn_det.cli import (
    DictAction,
    UsageError,
    add_amp_switch,
    add_deployed_switch,
    add_kernel_switch,
    build_runner,
    check_data,
    check_deployed_switch,
    choose_kernels,
    fail,
    load_config,
    set_amp,
    set_local_rank,
)

AP_NAMES = tuple(f'{kind}_mAP{size}' for kind in ('bbox', 'segm') for size in ('', '_50', '_75', '_s', '_m', '_l'))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and evaluate) a detector')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where the metrics go (default work_dirs/<config name>)')
    parser.add_argument('--out', help='dump raw predictions to this .pkl file (must not exist)')
    parser.add_argument('--show-dir', help='write images with detections painted to work_dir/<time>/SHOW_DIR')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='allow a checkpoint that pickles Python objects (can run code)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (mmengine syntax)')
    add_deployed_switch(parser, 'evaluate')
    add_amp_switch(parser, 'test')
    add_kernel_switch(parser)
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from mmengine.model import is_model_wrapper

    args = parse_args(argv)
    set_local_rank(args.local_rank)
    try:
        if args.out is not None:
            if not args.out.endswith(('.pkl', '.pickle')):
                raise UsageError(f'--out {args.out!r} must end in .pkl')
            if osp.exists(args.out):
                raise UsageError(f'--out {args.out!r} exists: remove it or choose another path')
        cfg = load_config(args.config, args.cfg_options, args.work_dir)
        choose_kernels(cfg, args.keep_mmcv_ops)
        check_data(cfg, 'test')
        if args.amp:
            if args.onnx or args.openvino:
                raise UsageError('--amp is for the PyTorch model: drop it with --onnx or --openvino')
            set_amp(cfg, 'test')
        deployed = deployed_model(args, cfg) if args.onnx or args.openvino or args.precision else None
        cfg.launcher = args.launcher
        ckpt = load_checkpoint_file(args.checkpoint, trust=args.trust_checkpoint)
        state = ckpt.get('state_dict', ckpt)
        cfg.load_from = None  # loaded strictly below instead of leniently by the runner
        cfg.setdefault('custom_hooks', []).append(dict(type='ProgressBarHook'))
        if args.show_dir:
            from mmdet.engine.hooks.utils import trigger_visualization_hook
            args.show, args.wait_time = False, 0
            cfg = trigger_visualization_hook(cfg, args)
        runner = build_runner(cfg)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        load_state_dict_strict(model, state, f'checkpoint {args.checkpoint!r}')
        if args.amp:
            from dcn_det.models import keep_float32
            keep_float32(model)
        if deployed is not None:
            runner.model = deployed  # the test loop calls runner.model.test_step: now onnxruntime's or OpenVINO's
    except (UsageError, CheckpointLoadError) as e:
        fail(str(e))
    if args.out is not None:
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    metrics = runner.test()
    if runner.rank == 0:
        rows = [(k, metrics[f'coco/{k}']) for k in AP_NAMES if f'coco/{k}' in metrics]
        print('\n'.join([f'{"metric":<14}{"value":>8}'] + [f'{k:<14}{v:>8.3f}' for k, v in rows]))
        out = osp.join(cfg.work_dir, 'test_metrics.json')
        with open(out, 'w') as f:
            json.dump({'config': args.config, 'checkpoint': args.checkpoint, 'onnx': args.onnx,
                       'openvino': args.openvino, 'precision': args.openvino and (args.precision or 'f32'),
                       'metrics': {k: float(v) for k, v in metrics.items()}}, f, indent=2)
        print(f'metrics written to {out}')
    return metrics


def deployed_model(args, cfg):
    """The ONNX file or OpenVINO IR as a model mmengine's test loop can run, once it is known to belong to cfg."""
    from dcn_det.deploy import ModelMismatchError, onnx_eval_model, open_deployed

    check_deployed_switch(args)
    if args.launcher != 'none':
        raise UsageError(f'{"--onnx" if args.onnx else "--openvino"} runs in one process: drop --launcher')
    try:
        detector = open_deployed(args.onnx, args.openvino, precision=args.precision)
        detector.check_matches(cfg, args.config, args.checkpoint)
    except (FileNotFoundError, ModelMismatchError, ValueError) as e:
        raise UsageError(str(e)) from None
    problem = detector.shape_problem()
    if problem:
        raise UsageError(problem)
    return onnx_eval_model(detector)


if __name__ == '__main__':
    main()
