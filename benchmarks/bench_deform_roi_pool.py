"""Deformable RoI pooling vs torchvision's aligned RoIAlign: forward and forward+backward time, peak memory.

    .venv/bin/python -m benchmarks.bench_deform_roi_pool [--device cpu|cuda] [--repeats 5] [--rois 512]

A stride-4 FPN level of two 512² images (2 x 256 x 128 x 128), RoIs of 16-112 px (log-uniform scale,
aspect 1:3 to 3:1, sorted by image as mmdet's ``bbox2roi`` makes them), 7 x 7 output, adaptive sampling
(``sampling_ratio=0``). The row the target is about is the modulated pool as the DCNv2 head uses it:
``deform_roi_pool(x, rois, offset) * mask`` with gradients for x, offset and mask. The full
``ModulatedDeformRoIPool`` module (plain pool, offset and mask fc predictors, deformable pool) is
reported for information. Variants are interleaved in every repeat and the medians are reported as
ratios to ``torchvision.ops.roi_align(aligned=True)`` measured in the same run. Peak memory: on CUDA
``max_memory_allocated`` during one forward+backward; on CPU (Linux) the peak RSS over one
forward+backward above the RSS before it (``VmHWM`` after a reset), each variant in a fresh process.
Writes ``work_dirs/bench/deform_roi_pool.json``; ``OMP_NUM_THREADS=1`` gives the one-core comparison
(torchvision's CPU roi_align is single-threaded, the native op is not).
"""
import argparse
import json
import math
import os
import os.path as osp
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torchvision

from benchmarks._machine import describe, machine
from benchmarks._memory import peak_rss, reset_peak_rss
from dcn_det.ops import ModulatedDeformRoIPool, deform_roi_pool

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

BASELINE = 'torchvision roi_align (aligned)'


def make_inputs(n_rois: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n, c, size, stride = 2, 256, 512, 4
    scale = torch.exp(torch.empty(n_rois).uniform_(math.log(16), math.log(112), generator=g))
    aspect = torch.exp(torch.empty(n_rois).uniform_(-math.log(3), math.log(3), generator=g))
    w, h = scale * aspect.sqrt(), scale / aspect.sqrt()
    cx, cy = torch.rand(n_rois, generator=g) * size, torch.rand(n_rois, generator=g) * size
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).clamp(0, size)
    batch = torch.arange(n_rois) * n // n_rois
    rois = torch.cat([batch[:, None].float(), boxes], 1)
    return dict(
        x=torch.randn(n, c, size // stride, size // stride, generator=g).to(device).requires_grad_(True),
        rois=rois.to(device),
        offset=(0.1 * torch.randn(n_rois, 2, 7, 7, generator=g)).to(device).requires_grad_(True),
        mask=torch.rand(n_rois, 1, 7, 7, generator=g).to(device).requires_grad_(True),
        grad=torch.randn(n_rois, c, 7, 7, generator=g).to(device),
        scale=1 / stride)


def variants(inp: dict, device: str) -> dict[str, Callable[[], tuple[Callable[[], torch.Tensor], list]]]:
    """name -> builder of (forward, tensors to differentiate with respect to)."""
    x, rois, offset, mask, scale = inp['x'], inp['rois'], inp['offset'], inp['mask'], inp['scale']

    def roi_align():
        return lambda: torchvision.ops.roi_align(x, rois, 7, scale, 0, aligned=True), [x]

    def modulated_op(backend='auto'):
        return (lambda: deform_roi_pool(x, rois, offset, 7, scale, 0, backend=backend) * mask,
                [x, offset, mask])

    def plain_op():
        return lambda: deform_roi_pool(x, rois, None, 7, scale, 0), [x]

    def module():
        pool = ModulatedDeformRoIPool(7, 256, spatial_scale=scale).to(device)
        # as if trained: non-zero offsets (zero-initialised ones make the offset gradient path trivial)
        torch.nn.init.normal_(pool.offset_fc[-1].weight, std=1e-4)
        return lambda: pool(x, rois), [x, *pool.parameters()]

    out = {BASELINE: roi_align,
           'deform_roi_pool x mask (modulated op)': modulated_op,
           'deform_roi_pool, no offset': plain_op,
           'ModulatedDeformRoIPool module (fc predictors incl.)': module}
    if device == 'cuda':
        out['deform_roi_pool x mask, native backend'] = lambda: modulated_op('native')
    return out


def sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def run(fn: Callable[[], torch.Tensor], wrt: list[torch.Tensor], grad: torch.Tensor, device: str,
        backward: bool) -> float:
    sync(device)
    start = time.perf_counter()
    if backward:
        torch.autograd.grad(fn(), wrt, grad)
    else:
        with torch.no_grad():
            fn()
    sync(device)
    return time.perf_counter() - start


def peak_memory(variant: str, args: argparse.Namespace) -> float:
    """MiB of peak memory growth over one forward+backward, in a fresh process."""
    out = subprocess.run([sys.executable, '-m', 'benchmarks.bench_deform_roi_pool', '--memory-of', variant,
                          '--rois', str(args.rois), '--device', args.device], cwd=REPO, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _memory_child(variant: str, args: argparse.Namespace) -> None:
    inp = make_inputs(args.rois, args.device)
    fn, wrt = variants(inp, args.device)[variant]()
    if args.device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run(fn, wrt, inp['grad'], args.device, True)
        print((torch.cuda.max_memory_allocated() - before) / 2**20)
    else:
        before = reset_peak_rss()
        run(fn, wrt, inp['grad'], args.device, True)
        print(peak_rss() - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--rois', type=int, default=512)
    parser.add_argument('--out', default=osp.join(REPO, 'work_dirs', 'bench', 'deform_roi_pool.json'))
    parser.add_argument('--memory-of', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        return _memory_child(args.memory_of, args)

    inp = make_inputs(args.rois, args.device)
    fns = {name: build() for name, build in variants(inp, args.device).items()}
    for fn, wrt in fns.values():  # warm-up
        run(fn, wrt, inp['grad'], args.device, True)
    times = {v: {'fwd': [], 'fwd_bwd': []} for v in fns}
    for _ in range(args.repeats):
        for v, (fn, wrt) in fns.items():
            times[v]['fwd'].append(run(fn, wrt, inp['grad'], args.device, False))
            times[v]['fwd_bwd'].append(run(fn, wrt, inp['grad'], args.device, True))
    base = statistics.median(times[BASELINE]['fwd_bwd'])
    rows = {}
    for v in fns:
        fwd, fwd_bwd = statistics.median(times[v]['fwd']), statistics.median(times[v]['fwd_bwd'])
        rows[v] = dict(fwd_ms=1e3 * fwd, fwd_bwd_ms=1e3 * fwd_bwd, ratio=fwd_bwd / base,
                       peak_mib=peak_memory(v, args))
    info = machine(args.device)
    device = describe(info)
    setup = f'2 x 256 x 128 x 128 (stride 4), {args.rois} RoIs of 16-112 px, 7 x 7, sampling_ratio 0'
    result = dict(device=device, machine=info, setup=setup, repeats=args.repeats,
                  target='modulated op fwd+bwd <= 2x roi_align', variants=rows)
    os.makedirs(osp.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    print(f'Deformable RoI pooling, {setup}, {device}, median of {args.repeats}\n')
    print('| variant | fwd ms | fwd+bwd ms | fwd+bwd × roi_align | peak MiB (fwd+bwd) |')
    print('| --- | --- | --- | --- | --- |')
    for v, r in rows.items():
        print(f"| {v} | {r['fwd_ms']:.0f} | {r['fwd_bwd_ms']:.0f} | {r['ratio']:.2f} | {r['peak_mib']:.0f} |")
    print(f'\nwritten to {args.out}')


if __name__ == '__main__':
    main()
