"""What the command-line tools share: loading a config, naming the work dir, failing in one line."""
import os
import os.path as osp
import sys
from typing import NoReturn, Optional

from mmengine.config import Config, DictAction  # noqa: F401  DictAction: for the tools' argparse

from dcn_det.dataset_check import DatasetFileError, check_dataset_files


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


def fail(message: str) -> NoReturn:
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def load_config(path: str, cfg_options: Optional[dict] = None, work_dir: Optional[str] = None) -> Config:
    """Load ``path`` with overrides; ``work_dir`` defaults to ``work_dirs/<config name>``."""
    if not osp.isfile(path):
        raise UsageError(f'config {path!r} does not exist')
    if not path.endswith('.py'):
        raise UsageError(f'config {path!r} is not a .py config file')
    try:
        cfg = Config.fromfile(path)
    except Exception as e:  # syntax errors, missing _base_ files: say which file
        raise UsageError(f'cannot read config {path!r}: {type(e).__name__}: {e}') from None
    if 'model' not in cfg:
        raise UsageError(f'{path!r} is not a detector config: it has no `model`')
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('work_dirs', osp.splitext(osp.basename(path))[0])
    return cfg


def add_kernel_switch(parser) -> None:
    """``--keep-mmcv-ops``: the tools build every model on dcn_det's kernels unless it is given."""
    parser.add_argument('--keep-mmcv-ops', action='store_true',
                        help="run mmcv's deformable layers on mmcv's kernels (default: convert them to dcn_det's "
                             "with dcn_det.convert_mmcv_ops; same weights and checkpoint keys)")


def add_deployed_switch(parser, verb: str) -> None:
    """``--onnx MODEL.onnx`` / ``--openvino MODEL.xml`` (with ``--precision``): ``verb`` an exported model
    instead of the checkpoint (``'evaluate'``, ``'run'``); checked by :func:`check_deployed_switch`."""
    parser.add_argument('--onnx', metavar='MODEL.onnx', help=f'{verb} this exported model in onnxruntime instead')
    parser.add_argument('--openvino', metavar='MODEL.xml', help=f'{verb} this exported OpenVINO IR in OpenVINO instead')
    parser.add_argument('--precision', help='OpenVINO inference precision with --openvino: f32 (default) or bf16')


def check_deployed_switch(args) -> None:
    """Refuse (UsageError) both exported models at once, or ``--precision`` without ``--openvino``."""
    if args.onnx and args.openvino:
        raise UsageError('--onnx and --openvino: give one exported model')
    if args.precision and not args.openvino:
        raise UsageError(f"--precision {args.precision} sets OpenVINO's precision: use it with --openvino MODEL.xml")


def choose_kernels(cfg: Config, keep_mmcv_ops: bool) -> None:
    """Build ``cfg``'s model converted to dcn_det's kernels (``type='ConvertMMCVOps'``) unless
    ``keep_mmcv_ops``, which also undoes a config's own ``ConvertMMCVOps``."""
    from dcn_det.models.convert import set_conversion

    set_conversion(cfg, convert=not keep_mmcv_ops)


def add_export_arguments(parser, out_help: str, runtime: str) -> None:
    """What both export tools take: CONFIG CHECKPOINT OUT, the fixed input (``--shape``, ``--batch-size``), the
    check against PyTorch in ``runtime`` (``--no-verify``), checkpoint trust, config overrides, the kernels."""
    parser.add_argument('config', help='detector config file')
    parser.add_argument('checkpoint', help='checkpoint of that detector')
    parser.add_argument('out', help=out_help)
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='fixed input height and width, multiples of the pad divisor (default: holds every '
                             'resized image)')
    parser.add_argument('--batch-size', type=int, default=1, help='fixed batch size (default 1)')
    parser.add_argument('--no-verify', action='store_true', help=f'skip the {runtime} vs PyTorch check')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='allow a checkpoint that pickles Python objects (can run code)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (mmengine syntax)')
    add_kernel_switch(parser)


def load_for_export(args):
    """(cfg, input spec, class names, detector with its checkpoint) for an export tool's ``args``; the
    batch size is checked first."""
    from dcn_det.checkpoint import load_detector
    from dcn_det.deploy import InputSpec, config_classes

    if args.batch_size < 1:
        raise UsageError(f'--batch-size must be >= 1, got {args.batch_size}')
    cfg = load_config(args.config, args.cfg_options)
    choose_kernels(cfg, args.keep_mmcv_ops)
    return (cfg, InputSpec.from_config(cfg), config_classes(cfg),
            load_detector(cfg, args.checkpoint, trust=args.trust_checkpoint))


def export_options(args, cfg: Config) -> dict:
    """The keyword arguments both export tools pass to their exporter: where the model came from (recorded in the
    file), the input shape and batch size, and whether to verify."""
    from dcn_det.deploy import model_sha256

    return dict(config_text=cfg.pretty_text, config_path=args.config, checkpoint=args.checkpoint,
                model_digest=model_sha256(cfg), shape=args.shape, batch_size=args.batch_size,
                verify=not args.no_verify)


def print_verification(result, runtime: str) -> None:
    """An export tool's report of its check (``result``: an ``ExportResult``) against PyTorch in ``runtime``."""
    if not result.max_abs_diff:
        return
    diffs = ', '.join(f'{k} {v:.2g}' for k, v in result.max_abs_diff.items())
    verdict = 'same detections' if result.same_detections else 'DIFFERENT detections'
    print(f'{runtime} vs PyTorch on a test batch: {verdict}; max |difference|: {diffs}')
    if not result.same_detections:
        print(f'warning: {runtime.split()[0]} and PyTorch disagree on the test batch (see above)', file=sys.stderr)


# where mmengine's AmpOptimWrapper (float16 with loss scaling) runs; on a CPU --amp is bfloat16 autocast
AMP_DEVICES = ('cuda', 'npu', 'mlu', 'musa')


def add_amp_switch(parser, what: str) -> None:
    parser.add_argument('--amp', action='store_true',
                        help=f'{what} in mixed precision: float16 on a GPU (mmengine\'s AmpOptimWrapper), bfloat16 '
                             'on a CPU with native bfloat16 (AVX512-BF16 or AMX; dcn_det.models.amp)')


def set_amp(cfg: Config, mode: str) -> None:
    """``--amp`` for a ``'train'`` or ``'test'`` run: mmengine's AmpOptimWrapper on an accelerator,
    ``CPUAmpOptimWrapper`` on a CPU; in testing mmengine's test loop with ``fp16``. A CPU without native
    bfloat16 is refused in one line. (A CPU test run also needs :func:`dcn_det.models.keep_float32` on
    the built model.)"""
    from mmengine.device import get_device

    device = get_device()
    if device == 'cpu':
        from dcn_det.models.amp import check_cpu_amp
        try:
            check_cpu_amp()
        except RuntimeError as e:
            raise UsageError(f'--amp: {e}') from None
    elif device not in AMP_DEVICES:
        raise UsageError(f'--amp runs on a CPU with native bfloat16 or on {", ".join(AMP_DEVICES)}, not {device}')
    if mode == 'test':
        cfg.test_cfg = dict(cfg.get('test_cfg') or dict(type='TestLoop'), fp16=True)
    elif device == 'cpu':
        cfg.optim_wrapper.type = 'CPUAmpOptimWrapper'
    else:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'


def check_data(cfg: Config, mode: str) -> None:
    """Refuse, in one line naming the path, a config whose annotation files or image folders for a
    ``'train'`` or ``'test'`` run are missing or corrupt (:mod:`dcn_det.dataset_check`): before the
    model is built, not in a pycocotools traceback once the runner starts."""
    try:
        check_dataset_files(cfg, mode)
    except DatasetFileError as e:
        raise UsageError(str(e)) from None


def build_runner(cfg: Config):
    """Build the runner the config asks for (``runner_type``), as mmdet's tools do."""
    from mmdet.registry import RUNNERS
    from mmengine.runner import Runner

    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


def set_local_rank(local_rank: int) -> None:
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK itself.
    os.environ.setdefault('LOCAL_RANK', str(local_rank))
