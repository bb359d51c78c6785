"""Train-step time of a detector config against its plain twin, and where the time of one step goes.

    .venv/bin/python -m benchmarks.bench_train_step                       # the demo: shapes_r18 dcnv2 vs plain
    .venv/bin/python -m benchmarks.bench_train_step --model r50          # Faster R-CNN R50-FPN, 2 x 512²
    .venv/bin/python -m benchmarks.bench_train_step --amp                # each also with --amp (bfloat16)

For each variant: the median time of a training iteration (``model.train_step``: data preprocessing,
forward, losses, backward and an SGD step through an mmengine optim wrapper) on the same random inputs
(mmdet's ``demo_mm_inputs``: the demo's batch of 4 images of 320² with 5 boxes each, or 2 images of 512²
for R50), variants interleaved, one warm-up each, ratios to plain from the same run. ``--amp`` adds each
variant trained as ``tools/train.py --amp`` trains on a CPU (``CPUAmpOptimWrapper``: bfloat16 autocast;
NMS, RoI pooling and losses in float32), its ratio taken to plain in the same precision, and its
speed-up over itself in float32. Then one profiled step of each variant, its time split into deformable
convs (dcn_det's op, forward and backward, GEMMs inside included), deformable RoI pooling, dense convs,
fc layers and everything else (losses, anchor assignment and sampling, NMS, elementwise ops): every
profiled op's self time goes to the first category (in that order) that the op or one of its ancestors
matches.
Writes ``work_dirs/bench/train_step_<model>.json``; the JSON and the table name the CPU.
"""
import argparse
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

MODELS = {
    'demo': dict(variants={'plain': 'shapes_r18_plain.py', 'dcnv2': 'shapes_r18_dcnv2.py'}, batch=4, size=320,
                 classes=5),
    'r50': dict(variants={'plain': 'faster_rcnn_r50_fpn.py', 'dcnv2': 'faster_rcnn_dcnv2.py'}, batch=2, size=512,
                classes=80),
}
# (category, substrings of an op's name or of an ancestor's), in priority order: an op goes to the first
# category that it or any of its ancestors matches (the GEMMs inside the deformable conv op are its own)
CATEGORIES = [
    ('deformable conv', ('dcn_det::deform_conv2d', 'GeneratedBackwardFor_dcn_det')),
    ('deformable RoI pooling', ('NativeDeformRoIPool',)),
    ('RoI align', ('roi_align', 'RoIAlign')),
    ('dense conv', ('mkldnn_convolution', 'convolution_backward', 'aten::conv')),
    ('fc layers', ('aten::addmm', 'aten::mm', 'aten::linear')),
]


def build(config: str):
    from mmdet.registry import MODELS as REGISTRY
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope

    import dcn_det  # noqa: F401

    cfg = Config.fromfile(osp.join(REPO, 'configs', config))
    cfg.model.backbone.init_cfg = None  # random weights: nothing to download
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = REGISTRY.build(cfg.model)
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    model.init_weights()
    return model.train()


def inputs(spec: dict):
    from mmdet.testing import demo_mm_inputs

    torch.manual_seed(0)
    return demo_mm_inputs(batch_size=spec['batch'], image_shapes=[(3, spec['size'], spec['size'])] * spec['batch'],
                          num_items=[5] * spec['batch'], num_classes=spec['classes'])


def optim_wrapper(model, amp: bool):
    from mmengine.optim import OptimWrapper

    from dcn_det.models import CPUAmpOptimWrapper

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    return CPUAmpOptimWrapper(optimizer=optimizer) if amp else OptimWrapper(optimizer=optimizer)


def train_step(model, wrapper, data) -> float:
    start = time.perf_counter()
    model.train_step(data, wrapper)
    return time.perf_counter() - start


def _category(event) -> str:
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    for category, keys in CATEGORIES:
        if any(k in name for name in names for k in keys):
            return category
    return 'other'


def breakdown(model, wrapper, data) -> dict:
    """Seconds of one profiled train step per category (self times, attributed to categorised ancestors)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, wrapper, data)
    seconds = {name: 0.0 for name, _ in CATEGORIES}
    seconds['other'] = 0.0
    for event in prof.events():
        seconds[_category(event)] += event.self_cpu_time_total / 1e6
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', choices=list(MODELS), default='demo')
    parser.add_argument('--repeats', type=int, default=5, help='timed steps per variant (median reported)')
    parser.add_argument('--threads', type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument('--amp', action='store_true', help='also each variant in bfloat16 mixed precision')
    parser.add_argument('--no-profile', action='store_true', help='skip the per-category breakdown')
    parser.add_argument('--out', default=None, help='JSON path (default work_dirs/bench/train_step_<model>.json)')
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error('--repeats must be >= 1')
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = MODELS[args.model]
    data = inputs(spec)
    precisions = ['', '-amp'] if args.amp else ['']
    models = {v + p: build(c) for p in precisions for v, c in spec['variants'].items()}
    wrappers = {v: optim_wrapper(m, v.endswith('-amp')) for v, m in models.items()}
    for v in models:  # warm-up
        train_step(models[v], wrappers[v], data)
    times = {v: [] for v in models}
    for _ in range(args.repeats):
        for v in models:
            times[v].append(train_step(models[v], wrappers[v], data))
    median = {v: statistics.median(t) for v, t in times.items()}
    plain = {v: 'plain-amp' if v.endswith('-amp') else 'plain' for v in median}  # the same precision's plain
    result = dict(machine=machine(), model=args.model, configs=spec['variants'], batch=spec['batch'],
                  size=spec['size'], repeats=args.repeats, times_s=times, median_s=median,
                  ratio_to_plain={v: median[v] / median[plain[v]] for v in median})
    if args.amp:
        result['amp_speedup'] = {v: median[v] / median[v + '-amp'] for v in spec['variants']}
    if not args.no_profile:
        result['breakdown_s'] = {v: breakdown(models[v], wrappers[v], data) for v in models}
    out = args.out or osp.join(REPO, 'work_dirs', 'bench', f'train_step_{args.model}.json')
    os.makedirs(osp.dirname(out), exist_ok=True)
    with open(out, 'w') as f:
        json.dump(result, f, indent=1)
    print(f"Train step, {args.model} ({spec['batch']} x {spec['size']}²), {describe(result['machine'])}, median of "
          f"{args.repeats}\n")
    print('| variant | step s | × plain | --amp speed-up |'
          + (''.join(f' {c} |' for c in result['breakdown_s']['plain']) if 'breakdown_s' in result else ''))
    print('| --- | --- | --- | --- |' + ' --- |' * (len(result.get('breakdown_s', {}).get('plain', {}))))
    for v in models:
        cells = ''.join(f' {s:.2f} |' for s in result['breakdown_s'][v].values()) if 'breakdown_s' in result else ''
        speedup = result.get('amp_speedup', {}).get(v.removesuffix('-amp'))
        speedup_cell = f'{speedup:.2f}×' if v.endswith('-amp') else '–'
        print(f"| {v} | {median[v]:.3f} | {result['ratio_to_plain'][v]:.2f} | {speedup_cell} |{cells}")
    print(f'\n(written to {out}; the breakdown columns are seconds of one profiled step, profiler overhead included)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
