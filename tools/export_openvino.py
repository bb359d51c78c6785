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

from dcn_det.checkpoint import CheckpointLoadError
from dcn_det.cli import UsageError, add_export_arguments, export_options, fail, load_for_export, print_verification


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Export a detector to an OpenVINO IR (.xml + .bin)')
    add_export_arguments(parser, '.xml file to write (it and its .bin must not exist)', 'OpenVINO')
    return parser.parse_args(argv)


def main(argv=None):
    from dcn_det.deploy import ConfigNotDeployableError, NotExportableError, export_openvino
    from dcn_det.deploy.openvino_ir import check_ir_target

    args = parse_args(argv)
    try:
        check_ir_target(args.out)  # before the model is built
        cfg, spec, classes, model = load_for_export(args)
        result = export_openvino(model, spec, args.out, classes=classes, **export_options(args, cfg))
    except (UsageError, CheckpointLoadError, ConfigNotDeployableError, NotExportableError, ValueError) as e:
        fail(str(e))
    size = (osp.getsize(args.out) + osp.getsize(osp.splitext(args.out)[0] + '.bin')) / 2**20
    print(f'wrote {args.out} and its .bin ({size:.1f} MiB): input images[{"x".join(map(str, result.input_shape))}], '
          f'{len(classes)} classes; operations: {", ".join(result.op_types)}')
    print_verification(result, 'OpenVINO (f32)')
    return result


if __name__ == '__main__':
    main()
