"""Export a trained detector to one OpenVINO IR (``OUT.xml`` and ``OUT.bin``), for Intel (and other x86) CPUs.

Usage::

    python tools/export_openvino.py configs/shapes_r18_dcnv2.py work_dirs/shapes_r18_dcnv2/epoch_12.pth dcnv2.xml
    python tools/export_openvino.py CONFIG CHECKPOINT OUT.xml --shape 800 1344     # fixed input H x W

The whole detector, as ``tools/export_onnx.py`` writes it (same inputs, outputs and metadata: class names,
input preparation, the config's model section by SHA-256, the checkpoint by SHA-256), converted from the
PyTorch model by OpenVINO's PyTorch frontend: deformable convs become OpenVINO's ``DeformableConvolution``,
deformable RoI pooling ``ROIAlign`` over offset bins, NMS ``NonMaxSuppression``; standard opsets only (checked),
weights in f32. The input shape is fixed: batch 1 (``--batch-size``) at the smallest padded size that
holds every image the config's resize makes, or ``--shape H W``.

After writing, the IR is run once in OpenVINO (f32) on a test batch and compared with PyTorch.
Use it with ``tools/infer.py CONFIG CHECKPOINT IMAGES --openvino OUT.xml`` and
``tools/test.py CONFIG CHECKPOINT --openvino OUT.xml`` (``--precision f32|bf16``; both refuse a config or
checkpoint it was not exported from).
"""
import argparse
import os.path as osp
import sys

from dcn_det.checkpoint import CheckpointLoadError
from dcn_det.cli import DictAction, UsageError, add_kernel_switch, choose_kernels, fail, load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Export a detector to an OpenVINO IR (.xml + .bin)')
    parser.add_argument('config', help='detector config file')
    parser.add_argument('checkpoint', help='checkpoint of that detector')
    parser.add_argument('out', help='.xml file to write (it and its .bin must not exist)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='fixed input height and width, multiples of the pad divisor (default: holds every '
                             'resized image)')
    parser.add_argument('--batch-size', type=int, default=1, help='fixed batch size (default 1)')
    parser.add_argument('--no-verify', action='store_true', help='skip the OpenVINO vs PyTorch check')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='allow a checkpoint that pickles Python objects (can run code)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (mmengine syntax)')
    add_kernel_switch(parser)
    return parser.parse_args(argv)


def main(argv=None):
    from dcn_det.checkpoint import load_detector
    from dcn_det.deploy import (
        ConfigNotDeployableError,
        InputSpec,
        NotExportableError,
        config_classes,
        export_openvino,
        model_sha256,
    )
    from dcn_det.deploy.openvino_ir import check_ir_target

    args = parse_args(argv)
    try:
        check_ir_target(args.out)  # before the model is built
        if args.batch_size < 1:
            raise UsageError(f'--batch-size must be >= 1, got {args.batch_size}')
        cfg = load_config(args.config, args.cfg_options)
        choose_kernels(cfg, args.keep_mmcv_ops)
        spec = InputSpec.from_config(cfg)
        classes = config_classes(cfg)
        model = load_detector(cfg, args.checkpoint, trust=args.trust_checkpoint)
        result = export_openvino(model, spec, args.out, classes=classes, config_text=cfg.pretty_text,
                                 config_path=args.config, checkpoint=args.checkpoint, model_digest=model_sha256(cfg),
                                 shape=args.shape, batch_size=args.batch_size, verify=not args.no_verify)
    except (UsageError, CheckpointLoadError, ConfigNotDeployableError, NotExportableError, ValueError) as e:
        fail(str(e))
    size = (osp.getsize(args.out) + osp.getsize(osp.splitext(args.out)[0] + '.bin')) / 2**20
    print(f'wrote {args.out} and its .bin ({size:.1f} MiB): input images[{"x".join(map(str, result.input_shape))}], '
          f'{len(classes)} classes; operations: {", ".join(result.op_types)}')
    if result.max_abs_diff:
        diffs = ', '.join(f'{k} {v:.2g}' for k, v in result.max_abs_diff.items())
        verdict = 'same detections' if result.same_detections else 'DIFFERENT detections'
        print(f'OpenVINO (f32) vs PyTorch on a test batch: {verdict}; max |difference|: {diffs}')
        if not result.same_detections:
            print('warning: OpenVINO and PyTorch disagree on the test batch (see above)', file=sys.stderr)
    return result


if __name__ == '__main__':
    main()
