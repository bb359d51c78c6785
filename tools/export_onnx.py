"""Export a trained detector to one ONNX file of standard operators.

Usage::

    python tools/export_onnx.py configs/shapes_r18_dcnv2.py work_dirs/shapes_r18_dcnv2/epoch_12.pth dcnv2.onnx
    python tools/export_onnx.py CONFIG CHECKPOINT OUT.onnx --dynamic            # any batch size and image size
    python tools/export_onnx.py CONFIG CHECKPOINT OUT.onnx --shape 800 1344     # fixed input H x W

The whole detector goes into the file: backbone with its deformable convs (ONNX ``DeformConv``), FPN,
RPN proposals with NMS, the RoI head with (modulated) deformable RoI pooling (``RoiAlign`` over
offset bins, with the config's sampling ratio, adaptive included; a Cascade R-CNN's three stages, each
refining the boxes of the one before), box decoding and per-class NMS, and a Mask R-CNN's mask head on the
detections (each one's RoI mask, a cascade's the mean of its stages'; pasting into the image stays outside the
graph, as resizing does).
Only standard ONNX domains are used (checked); opset 19 or newer (``DeformConv`` is opset 19).
mmdet zoo configs export too: their mmcv deformable layers are converted first (:func:`dcn_det.convert_mmcv_ops`;
``--keep-mmcv-ops`` keeps them, and the export then stops at the first one).

The file's inputs and outputs (``images``, ``img_shapes``, ``scale_factors`` in; ``boxes``, ``scores``,
``labels``, ``num_dets`` out, and ``masks`` for a mask model) are stated in ``dcn_det/deploy/metadata.py``; its
metadata (``dcn_det.*`` keys) holds the class names, the input preparation and the config it came from.
Normalisation happens inside the graph, resizing and padding outside it (``dcn_det.deploy.prepare`` /
``make_batch`` do both exactly as mmdet does).

By default the input has a fixed shape: batch 1 (``--batch-size``) and the smallest padded size that
holds every image the config's resize makes (square for a keep-ratio resize, e.g. 320x320 for the demo,
1344x1344 for COCO's 1333x800); ``--shape H W`` fixes another, ``--dynamic`` leaves N, H and W free.
A fixed-size model pads every image to that size, mmdet pads a batch to its largest image: a few RPN
anchors then lie in different padding, so detections can differ slightly; ``--dynamic`` reproduces mmdet.

After writing, the file is run once in onnxruntime on a test batch and compared with PyTorch.
Use it with ``tools/infer.py CONFIG CHECKPOINT IMAGES --onnx OUT.onnx`` and
``tools/test.py CONFIG CHECKPOINT --onnx OUT.onnx`` (both refuse a config it was not exported from).
"""
import argparse
import os.path as osp

from dcn_det.checkpoint import CheckpointLoadError
from dcn_det.cli import UsageError, add_export_arguments, export_options, fail, load_for_export, print_verification


def parse_args(argv=None):
    from dcn_det.deploy.export import DEFAULT_OPSET

    parser = argparse.ArgumentParser(description='Export a detector to ONNX (standard operators only)')
    add_export_arguments(parser, '.onnx file to write (must not exist)', 'onnxruntime')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                        help='ONNX opset, 19 or newer (default %(default)s)')
    parser.add_argument('--dynamic', action='store_true',
                        help='dynamic batch size, height and width (not with --batch-size/--shape)')
    return parser.parse_args(argv)


def main(argv=None):
    from dcn_det.deploy import ConfigNotDeployableError, NotExportableError, export_onnx
    from dcn_det.deploy.export import check_target

    args = parse_args(argv)
    try:
        if not args.out.endswith('.onnx'):
            raise UsageError(f'{args.out!r} must end in .onnx')
        check_target(args.out, args.opset)  # before the model is built
        if args.dynamic and (args.batch_size != 1 or args.shape):
            raise UsageError('--dynamic leaves batch size and shape free: drop --batch-size/--shape')
        cfg, spec, classes, model = load_for_export(args)
        result = export_onnx(model, spec, args.out, classes=classes, opset=args.opset, dynamic=args.dynamic,
                             **export_options(args, cfg))
    except (UsageError, CheckpointLoadError, ConfigNotDeployableError, NotExportableError, ValueError) as e:
        fail(str(e))
    shape = 'x'.join('?' if s is None else str(s) for s in result.input_shape)
    size = osp.getsize(args.out) / 2**20
    print(f'wrote {args.out} ({size:.1f} MiB): opset {result.opset}, input images[{shape}], '
          f'{len(classes)} classes; operators: {", ".join(result.op_types)}')
    print_verification(result, 'onnxruntime')
    return result


if __name__ == '__main__':
    main()
