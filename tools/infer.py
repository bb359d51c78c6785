"""Detect objects in images with a trained detector: PyTorch by default, onnxruntime with ``--onnx``, OpenVINO
with ``--openvino``.

Usage::

    python tools/infer.py configs/shapes_r18_dcnv2.py work_dirs/shapes_r18_dcnv2/epoch_12.pth data/shapes/val
    python tools/infer.py CONFIG CHECKPOINT a.jpg b.png photos/ --onnx dcnv2.onnx --out-dir out --score-thr 0.5
    python tools/infer.py CONFIG CHECKPOINT photos/ --openvino dcnv2.xml [--precision bf16]

INPUT is any mix of image files and folders (searched recursively for .jpg, .png, .bmp, .tif, .webp).
Written to ``--out-dir`` (default ``work_dirs/<config name>/infer_<time>``; an existing non-empty folder
is refused):

- a picture of each image with its detections drawn (boxes, class names, scores), under the image's
  own name (``_1``, ``_2``... appended when two inputs share a name);
- ``detections.json``: ``{"runtime", "config", "checkpoint", "onnx", "openvino", "score_thr", "classes",
  "images": [{"file", "picture", "width", "height", "detections": [{"box": [x1, y1, x2, y2], "score",
  "label", "class"}]}], "skipped": [{"file", "error"}], "complete"}``; boxes in the image's pixels. A mask
  model's detections also hold ``"mask": {"size": [h, w], "counts": "..."}``, COCO's compressed RLE as
  mmdet's ``DetInferencer`` writes it (``pycocotools.mask.decode`` reads it), and its pictures show the masks.
  It is rewritten every 50 images and when the run ends or is interrupted, so a long run always
  leaves what it has done.

A missing or unreadable image (or one too large for a fixed-size ONNX model) is reported, listed
under ``skipped``, and the run goes on. With ``--onnx`` (or ``--openvino``) the file's classes, input preparation and
source checkpoint must match CONFIG and CHECKPOINT (else it is refused, both sides named); the
PyTorch model is then not built. mmcv's deformable layers (mmdet zoo configs) run on dcn_det's kernels
(:func:`dcn_det.convert_mmcv_ops`); ``--keep-mmcv-ops`` keeps mmcv's.
"""
import argparse
import datetime
import json
import os
import os.path as osp
import sys
import time

from dcn_det.checkpoint import CheckpointLoadError, atomic_write
from dcn_det.cli import (
    DictAction,
    UsageError,
    add_deployed_switch,
    add_kernel_switch,
    check_deployed_switch,
    choose_kernels,
    fail,
    load_config,
)

SAVE_EVERY = 50


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Detect objects in images (PyTorch, onnxruntime or OpenVINO)')
    parser.add_argument('config', help='detector config file')
    parser.add_argument('checkpoint', help='checkpoint of that detector')
    parser.add_argument('inputs', nargs='+', metavar='INPUT', help='image files and/or folders of images')
    add_deployed_switch(parser, 'run')
    parser.add_argument('--out-dir', help='where pictures and detections.json go (new or empty folder)')
    parser.add_argument('--score-thr', type=float, default=0.3, help='keep detections scoring at least this '
                        '(default %(default)s)')
    parser.add_argument('--threads', type=int, help='CPU threads (default: the runtime\'s choice)')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='allow a checkpoint that pickles Python objects (can run code)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (mmengine syntax)')
    add_kernel_switch(parser)
    return parser.parse_args(argv)


def make_detector(args, cfg):
    from dcn_det.checkpoint import load_detector
    from dcn_det.deploy import TorchDetector, open_deployed

    if args.onnx or args.openvino:
        try:
            detector = open_deployed(args.onnx, args.openvino, threads=args.threads, precision=args.precision)
        except (FileNotFoundError, ValueError) as e:  # a missing .bin, a precision the CPU cannot run
            raise UsageError(str(e)) from None
        detector.check_matches(cfg, args.config, args.checkpoint)
        return detector, detector.classes
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from dcn_det.deploy import config_classes
    return TorchDetector(load_detector(cfg, args.checkpoint, trust=args.trust_checkpoint), cfg), config_classes(cfg)


def main(argv=None) -> dict:
    import cv2
    from mmengine.utils import ProgressBar

    from dcn_det.deploy import ConfigNotDeployableError, ImageReadError, ModelMismatchError, find_images, read_image
    from dcn_det.deploy.draw import draw_detections

    args = parse_args(argv)
    try:
        if not 0 <= args.score_thr <= 1:
            raise UsageError(f'--score-thr must lie in [0, 1], got {args.score_thr}')
        check_deployed_switch(args)
        for flag, path in (('--onnx', args.onnx), ('--openvino', args.openvino)):
            if path and not osp.isfile(path):
                raise UsageError(f'{flag} {path!r} does not exist')
        if not osp.isfile(args.checkpoint):
            raise UsageError(f'checkpoint {args.checkpoint!r} does not exist')
        cfg = load_config(args.config, args.cfg_options)
        choose_kernels(cfg, args.keep_mmcv_ops)
        out_dir = args.out_dir or osp.join(cfg.work_dir, datetime.datetime.now().strftime('infer_%Y%m%d_%H%M%S'))
        if osp.isdir(out_dir) and os.listdir(out_dir):
            raise UsageError(f'--out-dir {out_dir!r} is not empty: choose a new folder')
        if osp.exists(out_dir) and not osp.isdir(out_dir):
            raise UsageError(f'--out-dir {out_dir!r} is a file')
        files = find_images(args.inputs)
        if not files:
            raise UsageError(f'no images found in {" ".join(args.inputs)}')
        detector, classes = make_detector(args, cfg)
    except (UsageError, CheckpointLoadError, ConfigNotDeployableError, ModelMismatchError) as e:
        fail(str(e))
    os.makedirs(out_dir, exist_ok=True)
    runtime = 'onnxruntime' if args.onnx else f'openvino {args.precision or "f32"}' if args.openvino else 'pytorch'
    report = dict(runtime=runtime, config=args.config, checkpoint=args.checkpoint, onnx=args.onnx,
                  openvino=args.openvino, score_thr=args.score_thr, classes=list(classes), images=[], skipped=[],
                  complete=False)
    json_path = osp.join(out_dir, 'detections.json')
    used = set()
    start = time.perf_counter()
    bar = ProgressBar(len(files), file=sys.stderr) if len(files) > 1 else None
    try:
        for i, path in enumerate(files):
            try:
                image = read_image(path)
                det = detector([image])[0].above(args.score_thr)
            except (ImageReadError, ValueError) as e:
                print(f'\nskipped {e}', file=sys.stderr)
                report['skipped'].append(dict(file=path, error=str(e)))
            else:
                picture = _picture_path(out_dir, path, used)
                cv2.imwrite(picture, draw_detections(image, det.boxes, det.scores, det.labels, classes, det.masks))
                detections = [dict(box=[round(float(v), 2) for v in box], score=round(float(score), 4),
                                   label=int(label), **{'class': classes[label]})
                              for box, score, label in zip(det.boxes, det.scores, det.labels, strict=True)]
                for detection, mask in zip(detections, det.masks if det.masks is not None else [], strict=False):
                    detection['mask'] = _rle(mask)
                report['images'].append(dict(file=path, picture=picture, height=image.shape[0],
                                             width=image.shape[1], detections=detections))
            if bar is not None:
                bar.update()
            if (i + 1) % SAVE_EVERY == 0:
                _write_json(report, json_path)
        report['complete'] = True
    finally:
        _write_json(report, json_path)
    done, seconds = len(report['images']), time.perf_counter() - start
    count = sum(len(im['detections']) for im in report['images'])
    print(f'\n{done} images ({seconds / max(done, 1):.2f} s each, {report["runtime"]}), {count} detections with '
          f'score >= {args.score_thr}, {len(report["skipped"])} skipped -> {out_dir}')
    return report


def _picture_path(out_dir: str, path: str, used: set) -> str:
    stem, ext = osp.splitext(osp.basename(path))
    ext = ext if ext.lower() in ('.jpg', '.jpeg', '.png', '.bmp') else '.png'
    name, n = f'{stem}{ext}', 0
    while name in used:
        n += 1
        name = f'{stem}_{n}{ext}'
    used.add(name)
    return osp.join(out_dir, name)


def _rle(mask) -> dict:
    """COCO's compressed RLE of ``mask (bool[H, W])``, its counts as text (as mmdet's DetInferencer writes it)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {'size': [int(v) for v in rle['size']], 'counts': rle['counts'].decode()}


def _write_json(report: dict, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            json.dump(report, f, indent=1)

    atomic_write(path, write)


if __name__ == '__main__':
    main()
