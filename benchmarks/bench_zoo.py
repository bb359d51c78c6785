"""mmdet's own zoo models on mmcv's deformable kernels vs the same models after ``dcn_det.convert_mmcv_ops``.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.bench_zoo [--repeats 3] [--size 800 1216] [--models vfnet ...]

Models (mmdet 3.3 configs, random weights, nothing downloaded; the offset predictors get small random
weights, so the layers deform as trained ones do): VFNet R50 mdconv c3-c5, Faster R-CNN R50 mdconv c3-c5,
RepPoints R50 (moment, GN heads). For each, a train step (data preprocessing, forward, losses, backward,
SGD step) on 2 images of 512² with 5 boxes each, and inference (``test_step`` path, no gradients) on
one image of ``--size`` (default 800x1216, COCO's test size). The mmcv and the converted copy hold the
same weights; every repeat times both, interleaved, after one warm-up each; medians are reported.
Writes ``work_dirs/bench/zoo.json`` and prints a table naming the CPU, its flags and the threads.
"""
import argparse
import copy
import json
import logging
import os
import os.path as osp
import statistics
import sys
import time

import torch

from benchmarks._machine import describe, machine

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

ZOO = {
    'vfnet': ('VFNet R50 mdconv', 'vfnet/vfnet_r50-mdconv-c3-c5_fpn_ms-2x_coco.py'),
    'faster-mdconv': ('Faster R-CNN R50 mdconv', 'dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py'),
    'reppoints': ('RepPoints R50', 'reppoints/reppoints-moment_r50_fpn-gn_head-gn_1x_coco.py'),
}
FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile')


def cpu_flags() -> list:
    try:
        with open('/proc/cpuinfo') as f:
            flags = next(line.split(':', 1)[1].split() for line in f if line.startswith('flags'))
    except (OSError, StopIteration):
        return []
    return [f for f in FLAGS if f in flags]


def build(config: str):
    """The zoo model (mmcv's layers) with random weights, and its converted copy with the same weights."""
    import mmdet
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope

    import dcn_det

    cfg = Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', config))
    cfg.model.backbone.init_cfg = None  # random weights: nothing to download
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights logs every parameter
    model.init_weights()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'conv_offset' in name:  # about a pixel of offset, masks away from 0.5
                p.copy_(torch.randn(p.shape, generator=g) * (0.01 if p.dim() > 1 else 0.1))
    return model, dcn_det.convert_mmcv_ops(copy.deepcopy(model))


def train_inputs():
    from mmdet.testing import demo_mm_inputs

    torch.manual_seed(0)
    return demo_mm_inputs(batch_size=2, image_shapes=[(3, 512, 512)] * 2, num_items=[5, 5], num_classes=80)


def test_inputs(size):
    from mmdet.testing import demo_mm_inputs

    torch.manual_seed(1)
    return demo_mm_inputs(batch_size=1, image_shapes=[(3, *size)], num_items=[5], num_classes=80)


def train_step(model, optimizer, data) -> float:
    model.train()
    start = time.perf_counter()
    batch = model.data_preprocessor(copy.deepcopy(data), True)
    loss = model.parse_losses(model(**batch, mode='loss'))[0]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def infer(model, data) -> float:
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        model.test_step(copy.deepcopy(data))
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', choices=list(ZOO), default=list(ZOO))
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per model and kernel (median reported)')
    parser.add_argument('--size', type=int, nargs=2, default=(800, 1216), metavar=('H', 'W'),
                        help='inference image size, multiples of 32 (default %(default)s)')
    parser.add_argument('--threads', type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument('--out', default=osp.join(REPO, 'work_dirs', 'bench', 'zoo.json'))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error('--repeats must be >= 1')
    if args.threads:
        torch.set_num_threads(args.threads)
    train_data, test_data = train_inputs(), test_inputs(tuple(args.size))
    rows = {}
    for key in args.models:
        title, config = ZOO[key]
        print(f'{title}: building', file=sys.stderr)
        models = dict(zip(('mmcv', 'dcn_det'), build(config), strict=True))
        optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-5, momentum=0.9) for k, m in models.items()}
        times = {f'{phase}_{k}': [] for phase in ('train', 'infer') for k in models}
        for repeat in range(args.repeats + 1):  # the first is the warm-up
            now = {}
            for k, m in models.items():
                now[f'train_{k}'] = train_step(m, optimizers[k], train_data)
                now[f'infer_{k}'] = infer(m, test_data)
            if repeat:
                for name, seconds in now.items():
                    times[name].append(seconds)
            print(f"  {f'repeat {repeat}/{args.repeats}' if repeat else 'warm-up'}: "
                  + ', '.join(f'{name} {seconds:.2f} s' for name, seconds in now.items()), file=sys.stderr)
        median = {k: statistics.median(v) for k, v in times.items()}
        rows[key] = dict(title=title, config=config, times_s=times, median_s=median,
                         train_speedup=median['train_mmcv'] / median['train_dcn_det'],
                         infer_speedup=median['infer_mmcv'] / median['infer_dcn_det'])
    info = dict(machine(), cpu_flags=cpu_flags())
    result = dict(machine=info, repeats=args.repeats, train=dict(images=2, size=[512, 512], boxes=5),
                  infer=dict(images=1, size=list(args.size)), models=rows)
    os.makedirs(osp.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    h, w = args.size
    print(f"\nmmdet zoo models, mmcv's kernels vs dcn_det.convert_mmcv_ops; {describe(info)}; CPU flags "
          f"{' '.join(info['cpu_flags']) or 'none of ' + '/'.join(FLAGS)}; median of {args.repeats}\n")
    print(f'| model | train step 2x512² mmcv s | dcn_det s | speed-up | inference 1x{h}x{w} mmcv s | dcn_det s | '
          'speed-up |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for row in rows.values():
        m = row['median_s']
        print(f"| {row['title']} | {m['train_mmcv']:.2f} | {m['train_dcn_det']:.2f} | {row['train_speedup']:.2f}x | "
              f"{m['infer_mmcv']:.2f} | {m['infer_dcn_det']:.2f} | {row['infer_speedup']:.2f}x |")
    print(f'\n(written to {args.out})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
