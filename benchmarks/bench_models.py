"""Faster R-CNN R50-FPN: plain vs mdconv vs mdpool vs both, train step / inference time, memory, params.

    .venv/bin/python -m benchmarks.bench_models [--device cpu|cuda] [--repeats 3] [--size 512]

Same inputs for every variant (2 images, 5 boxes each), variants interleaved in every repeat,
medians reported as ratios to plain measured in the same run. Peak memory: on CUDA
``max_memory_allocated`` during one train step; on CPU the growth of the process's peak RSS over one
train step (VmHWM after a reset), each variant in a fresh subprocess. Writes ``work_dirs/bench/models.json``.
"""
import argparse
import json
import logging
import os
import os.path as osp
import statistics
import subprocess
import sys
import time

import torch

from benchmarks._machine import describe, machine
from benchmarks._memory import peak_rss, reset_peak_rss

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

VARIANTS = {
    'plain': ('faster_rcnn_r50_fpn.py', {}),
    'mdconv': ('faster_rcnn_mdconv.py', {}),
    'mdpool': ('faster_rcnn_mdpool.py', {}),
    'mdconv+mdpool': ('faster_rcnn_dcnv2.py', {}),
    'mdconv+mdpool, per-level pool predictor': ('faster_rcnn_dcnv2.py', {'share_offset_predictor': False}),
}


def build(variant: str, device: str):
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope

    import dcn_det  # noqa: F401

    config, extractor = VARIANTS[variant]
    cfg = Config.fromfile(osp.join(REPO, 'configs', config))
    cfg.model.backbone.init_cfg = None
    if extractor:
        cfg.model.roi_head.bbox_roi_extractor.update(extractor)
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).to(device)
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights logs every parameter
    model.init_weights()
    return model


def inputs(size: int, device: str):
    from mmdet.testing import demo_mm_inputs

    torch.manual_seed(0)
    data = demo_mm_inputs(batch_size=2, image_shapes=[(3, size, size)] * 2, num_items=[5, 5], num_classes=80,
                          device=device)
    return data


def sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def train_step(model, data, device: str) -> float:
    model.train()
    sync(device)
    start = time.perf_counter()
    batch = model.data_preprocessor(data, True)
    model.parse_losses(model(**batch, mode='loss'))[0].backward()
    sync(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@torch.no_grad()
def infer(model, data, device: str) -> float:
    model.eval()
    sync(device)
    start = time.perf_counter()
    model(**model.data_preprocessor(data, False), mode='predict')
    sync(device)
    return time.perf_counter() - start


def params(model) -> dict:
    deform = sum(p.numel() for n, p in model.named_parameters() if any(k in n for k in ('conv_offset', 'offset_fc',
                                                                                          'mask_fc')))
    return {'total': sum(p.numel() for p in model.parameters()), 'offset_predictors': deform}


def peak_memory(variant: str, size: int, device: str) -> float:
    """MiB of peak memory growth over one train step, in a fresh process."""
    out = subprocess.run([sys.executable, '-m', 'benchmarks.bench_models', '--memory-of', variant, '--size', str(size),
                          '--device', device], cwd=REPO, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _memory_child(variant: str, size: int, device: str) -> None:
    model, data = build(variant, device), inputs(size, device)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        train_step(model, data, device)
        print((torch.cuda.max_memory_allocated() - before) / 2**20)
    else:
        before = reset_peak_rss()
        train_step(model, data, device)
        print(peak_rss() - before)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=list(VARIANTS), metavar='VARIANT',
                        help='any of: ' + '; '.join(VARIANTS) + ' (default: all; plain is always measured)')
    parser.add_argument('--out', default=osp.join(REPO, 'work_dirs', 'bench', 'models.json'))
    parser.add_argument('--memory-of', choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error('--repeats must be at least 1')
    if args.memory_of:
        return _memory_child(args.memory_of, args.size, args.device)

    data = inputs(args.size, args.device)
    # ratios are to plain, measured in the same run
    variants = dict.fromkeys(['plain', *args.variants])
    models = {v: build(v, args.device) for v in variants}
    for m in models.values():  # warm-up
        train_step(m, data, args.device), infer(m, data, args.device)
    times = {v: {'train': [], 'infer': []} for v in models}
    for _ in range(args.repeats):
        for v, m in models.items():
            times[v]['train'].append(train_step(m, data, args.device))
            times[v]['infer'].append(infer(m, data, args.device))
    base = {k: statistics.median(times['plain'][k]) for k in ('train', 'infer')}
    rows = {}
    for v, m in models.items():
        train, inf = statistics.median(times[v]['train']), statistics.median(times[v]['infer'])
        rows[v] = dict(train_s=train, infer_s=inf, train_ratio=train / base['train'], infer_ratio=inf / base['infer'],
                       params=params(m), peak_mib=peak_memory(v, args.size, args.device))
    info = machine(args.device)
    device = describe(info)
    result = dict(device=device, machine=info, size=args.size, batch=2, repeats=args.repeats, variants=rows)
    os.makedirs(osp.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    print(f'Faster R-CNN R50-FPN, 2 x {args.size}² images, {device}, median of {args.repeats}\n')
    print('| variant | train step s | × plain | inference s | × plain | peak MiB (train step) | params (M) '
          '| offset predictors (M) |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- |')
    for v, r in rows.items():
        print(f"| {v} | {r['train_s']:.2f} | {r['train_ratio']:.2f} | {r['infer_s']:.2f} | {r['infer_ratio']:.2f} "
              f"| {r['peak_mib']:.0f} | {r['params']['total'] / 1e6:.1f} "
              f"| {r['params']['offset_predictors'] / 1e6:.1f} |")
    print(f'\nwritten to {args.out}')


if __name__ == '__main__':
    main()
