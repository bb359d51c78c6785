"""Speed and memory of one DCNv2 forward+backward per backend, as multiples of a dense 3x3 conv.

For each shape (batch 2, 3x3, stride 1, padding 1, C_in = C_out; c3 = 128 channels at 64x64, c4 =
256 at 32x32, c5 = 512 at 16x16, the ResNet stages of a 512x512 image) it times a forward and a
backward producing the gradients of input, offset, mask, weight and bias, for F.conv2d (dense, no
offsets) and for dcn_det's ``deform_conv2d`` with each backend. Runs are interleaved (dense, native,
mmcv, torchvision, dense, ...) and summarised by medians, so that load from other processes hits all
of them alike; ratios are to the dense median of the same run (and, as a second figure, fastest run
to fastest run: on a machine shared with other work the fastest runs are the least disturbed).

Peak extra memory is the most tensor memory one forward+backward holds at once on top of its inputs
(output, temporaries and the returned gradients included), after one warm-up call on a 4x4 input:
on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the call; on CPU the running
sum of the allocations and frees that the PyTorch profiler records (``profile_memory=True``), which
also sees the tensors mmcv's and torchvision's C++ kernels allocate. (Not the process's resident set,
which glibc's heap leaves higher and noisier.)

    .venv/bin/python benchmarks/bench_deform_conv.py                # c3,c4,c5, 5 repeats
    .venv/bin/python benchmarks/bench_deform_conv.py --shapes c5 --repeats 11 --no-memory
"""
import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

SHAPES = {'c3': (128, 64), 'c4': (256, 32), 'c5': (512, 16)}
METHODS = ('dense', 'native', 'mmcv', 'torchvision')


def make_inputs(shape: str, device: str, batch: int = 2, seed: int = 0, size: int = 0) -> dict:
    channels, size = SHAPES[shape][0], size or SHAPES[shape][1]
    gen = torch.Generator().manual_seed(seed)

    def randn(*s, std=1.0):
        return (torch.randn(*s, generator=gen) * std).to(device).requires_grad_()

    return dict(input=randn(batch, channels, size, size),
                offset=randn(batch, 18, size, size),
                mask=torch.rand(batch, 9, size, size, generator=gen).to(device).requires_grad_(),
                weight=randn(channels, channels, 3, 3, std=(9 * channels) ** -0.5),
                bias=randn(channels))


def step(method: str, t: dict) -> None:
    """One forward+backward of ``method`` on the tensors ``t``; gradients are discarded."""
    from dcn_det.ops import deform_conv2d

    if method == 'dense':
        out = F.conv2d(t['input'], t['weight'], t['bias'], padding=1)
        inputs = (t['input'], t['weight'], t['bias'])
    else:
        out = deform_conv2d(t['input'], t['offset'], t['weight'], t['bias'], padding=1, mask=t['mask'],
                            backend=method)
        inputs = tuple(t.values())
    torch.autograd.grad(out, inputs, torch.ones_like(out))


def sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def time_shape(shape: str, methods: list, repeats: int, device: str) -> dict:
    tensors = make_inputs(shape, device)
    for m in methods:  # warm-up: lazy initialisation, allocator, thread pools
        step(m, tensors)
    times = {m: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            sync(device)
            start = time.perf_counter()
            step(m, tensors)
            sync(device)
            times[m].append(time.perf_counter() - start)
    return times


def peak_memory(shape: str, method: str, device: str) -> int:
    """Bytes of tensors one forward+backward allocates beyond its inputs, at their peak."""
    tensors = make_inputs(shape, device)
    step(method, make_inputs(shape, device, batch=1, size=4))  # library set-up, not the op's memory
    if device.startswith('cuda'):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(method, tensors)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(method, tensors)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / 'trace.json'
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())['traceEvents']
    live = peak = 0
    for e in sorted((e for e in events if e.get('name') == '[memory]'), key=lambda e: e['ts']):
        live += e['args']['Bytes']
        peak = max(peak, live)
    return peak


def _load_average() -> list:
    try:
        with open('/proc/loadavg') as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return []


def device_name(device: str) -> str:
    if device.startswith('cuda'):
        return torch.cuda.get_device_name(device)
    model = platform.processor() or 'cpu'
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{model}, {threads} thread{'s' if threads > 1 else ''}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--shapes', default='c3,c4,c5', help=f'comma-separated, from {list(SHAPES)}')
    parser.add_argument('--repeats', type=int, default=5, help='timed runs per method (median reported)')
    parser.add_argument('--methods', default=','.join(METHODS), help=f'comma-separated, from {METHODS}')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=0,
                        help='CPU threads (torch.set_num_threads); 0 keeps torch\'s default. On a machine '
                             'whose cores are busy with other work, 1 gives steadier numbers')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--out', default='work_dirs/bench/deform_conv.json', help='JSON results path')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = args.shapes.split(',')
    methods = args.methods.split(',')
    for name, valid in ((shapes, SHAPES), (methods, METHODS)):
        unknown = sorted(set(name) - set(valid))
        if unknown:
            parser.error(f'unknown {unknown}: choose from {list(valid)}')
    if 'dense' not in methods:
        methods.insert(0, 'dense')
    results = dict(device=device_name(args.device), torch=torch.__version__, repeats=args.repeats,
                   batch=2, load_average=_load_average(), shapes={})
    for shape in shapes:
        times = time_shape(shape, methods, args.repeats, args.device)
        med = {m: statistics.median(v) for m, v in times.items()}
        best = {m: min(v) for m, v in times.items()}
        entry = dict(channels=SHAPES[shape][0], size=SHAPES[shape][1], times_s=times, median_s=med,
                     ratio_to_dense={m: med[m] / med['dense'] for m in methods},
                     best_ratio_to_dense={m: best[m] / best['dense'] for m in methods})
        if not args.no_memory:
            entry['peak_extra_bytes'] = {m: peak_memory(shape, m, args.device) for m in methods}
        results['shapes'][shape] = entry
        print(f'{shape}: ' + ', '.join(f'{m} {med[m] * 1e3:.1f} ms' for m in methods), file=sys.stderr)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(markdown(results, methods))
    print(f'\n(written to {out})')
    return 0


def markdown(results: dict, methods: list) -> str:
    lines = [f"DCNv2 forward+backward, batch {results['batch']}, 3x3 s1 p1, {results['device']}, "
             f"torch {results['torch']}, median of {results['repeats']}, load average before "
             f"{results['load_average'][:1]}; time as a multiple of dense (dense in ms; ratio of medians, "
             f"and of the fastest runs, which other load disturbs least), peak extra memory in MiB",
             '',
             '| shape | ' + ' | '.join(methods) + ' |',
             '|---|' + '---|' * len(methods)]
    for shape, e in results['shapes'].items():
        cells = []
        for m in methods:
            cell = f"{e['median_s'][m] * 1e3:.0f} ms" if m == 'dense' else \
                f"{e['ratio_to_dense'][m]:.2f}x (best {e['best_ratio_to_dense'][m]:.2f}x)"
            if 'peak_extra_bytes' in e:
                cell += f" / {e['peak_extra_bytes'][m] / 2**20:.0f} MiB"
            cells.append(cell)
        lines.append(f"| {shape} ({e['channels']}ch@{e['size']}²) | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


if __name__ == '__main__':
    sys.exit(main())
