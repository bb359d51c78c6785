"""Speed and memory of one DCNv2 forward+backward per kernel, as multiples of a dense 3x3 conv.

Shapes (3x3, stride 1, padding 1, C_in = C_out): the ResNet-50 stages of a 512x512 image at batch 2
(c3 = 128 channels at 64x64, c4 = 256 at 32x32, c5 = 512 at 16x16) and the demo's stages (R18 at half
width, 320x320, batch 4: demo-c3 = 64 at 40x40, demo-c4 = 128 at 20x20, demo-c5 = 256 at 10x10).
Offsets are Gaussian with a std of 2 px (``--offset-std``), about what trained layers have (zero
offsets would put every sample on an integer position), masks uniform in [0, 1].

Each run times a forward and a backward producing the gradients of input, offset, mask, weight and
bias, for ``F.conv2d`` (dense: oneDNN on CPU, cuDNN on CUDA; no offsets) and for ``deform_conv2d``:
``native`` (the compiled CPU kernel, or the public path on CUDA), ``native-public`` (the public-API
fallback), ``mmcv`` and ``torchvision``. Methods are interleaved (dense, native, ..., dense, ...) and
summarised by medians, so load from other processes hits all alike; ratios are to the dense median of
the same run and thread count. ``--threads 1,2`` measures each thread count in turn. ``--amp`` runs
every method, dense included, under ``torch.autocast(device, dtype=torch.bfloat16)`` (mixed-precision
training's forward and backward; on a CPU with native bfloat16 the native op then computes in bfloat16),
against its own targets.

Peak extra memory is the most tensor memory one forward+backward holds at once on top of its inputs,
after one warm-up call: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the
call; on CPU the running sum of the allocations and frees the PyTorch profiler records.

    .venv/bin/python -m benchmarks.bench_deform_conv --threads 1,2 --repeats 7
    .venv/bin/python -m benchmarks.bench_deform_conv --threads 1,2 --repeats 7 --amp --shapes c3,c4,c5 \
        --methods dense,native
    .venv/bin/python -m benchmarks.bench_deform_conv --shapes demo-c3,demo-c4,demo-c5 --methods dense,native
"""
import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks._machine import describe, machine

# name: (channels, size, batch)
SHAPES = {'c3': (128, 64, 2), 'c4': (256, 32, 2), 'c5': (512, 16, 2),
          'demo-c3': (64, 40, 4), 'demo-c4': (128, 20, 4), 'demo-c5': (256, 10, 4)}
METHODS = ('dense', 'native', 'native-public', 'mmcv', 'torchvision')
TARGETS = {'c3': 2.5, 'c4': 1.7, 'c5': 1.3, 'demo-c3': 3.0, 'demo-c4': 2.0, 'demo-c5': 1.7}
# under bfloat16 autocast, as multiples of the dense conv under the same autocast
AMP_TARGETS = {'c3': 2.0, 'c4': 1.6, 'c5': 1.5}


def make_inputs(shape: str, device: str, offset_std: float = 2.0, seed: int = 0, size: int = 0) -> dict:
    channels, default_size, batch = SHAPES[shape]
    size = size or default_size
    gen = torch.Generator().manual_seed(seed)

    def randn(*s, std=1.0):
        return (torch.randn(*s, generator=gen) * std).to(device).requires_grad_()

    return dict(input=randn(batch, channels, size, size),
                offset=randn(batch, 18, size, size, std=offset_std),
                mask=torch.rand(batch, 9, size, size, generator=gen).to(device).requires_grad_(),
                weight=randn(channels, channels, 3, 3, std=(9 * channels) ** -0.5),
                bias=randn(channels))


def step(method: str, t: dict, amp: bool = False) -> None:
    """One forward+backward of ``method`` on the tensors ``t`` (under bfloat16 autocast if ``amp``);
    gradients are discarded."""
    device = t['input'].device.type
    with torch.autocast(device, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
        _step(method, t)


def _step(method: str, t: dict) -> None:
    from dcn_det.ops import deform_conv2d, use_cpu_kernel

    if method == 'dense':
        out = F.conv2d(t['input'], t['weight'], t['bias'], padding=1)
        torch.autograd.grad(out, (t['input'], t['weight'], t['bias']), torch.ones_like(out))
        return
    backend, _, kernel = method.partition('-')
    on_cpu = backend == 'native' and t['input'].device.type == 'cpu'
    with use_cpu_kernel(kernel or 'compiled') if on_cpu else contextlib.nullcontext():
        out = deform_conv2d(t['input'], t['offset'], t['weight'], t['bias'], padding=1, mask=t['mask'],
                            backend=backend)
        torch.autograd.grad(out, tuple(t.values()), torch.ones_like(out))


def sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def time_shape(shape: str, methods: list, repeats: int, device: str, offset_std: float, amp: bool = False) -> dict:
    tensors = make_inputs(shape, device, offset_std)
    for m in methods:  # warm-up: lazy initialisation, allocator, thread pools
        step(m, tensors, amp)
    times = {m: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            sync(device)
            start = time.perf_counter()
            step(m, tensors, amp)
            sync(device)
            times[m].append(time.perf_counter() - start)
    return times


def peak_memory(shape: str, method: str, device: str, offset_std: float, amp: bool = False) -> int:
    """Bytes of tensors one forward+backward allocates beyond its inputs, at their peak."""
    tensors = make_inputs(shape, device, offset_std)
    step(method, make_inputs(shape, device, offset_std, size=4), amp)  # library set-up, not the op's memory
    if device.startswith('cuda'):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(method, tensors, amp)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(method, tensors, amp)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / 'trace.json'
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())['traceEvents']
    live = peak = 0
    for e in sorted((e for e in events if e.get('name') == '[memory]'), key=lambda e: e['ts']):
        live += e['args']['Bytes']
        peak = max(peak, live)
    return peak


def _choices(valid):
    def parse(text: str) -> list:
        items = text.split(',')
        unknown = [i for i in items if i not in valid]
        if unknown:
            raise argparse.ArgumentTypeError(f'unknown {unknown}: choose from {list(valid)}')
        return items
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--shapes', type=_choices(SHAPES), default=list(SHAPES),
                        help=f'comma-separated, from {list(SHAPES)}')
    parser.add_argument('--methods', type=_choices(METHODS), default=['dense', 'native', 'native-public'],
                        help=f'comma-separated, from {list(METHODS)} (dense is always measured)')
    parser.add_argument('--repeats', type=int, default=5, help='timed runs per method (median reported)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--threads', type=_choices([str(i) for i in range(1, 257)]), default=None,
                        help="CPU thread counts to measure in turn, e.g. '1,2' (default: torch's)")
    parser.add_argument('--offset-std', type=float, default=2.0, help='std of the offsets in pixels')
    parser.add_argument('--amp', action='store_true', help='every method under bfloat16 autocast')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--out', default='work_dirs/bench/deform_conv.json', help='JSON results path')
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error('--repeats must be >= 1')
    if args.device == 'cuda' and 'native-public' in args.methods:
        args.methods.remove('native-public')  # on CUDA native is the public path already
    if 'dense' not in args.methods:
        args.methods.insert(0, 'dense')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = []
    for threads in [int(t) for t in args.threads] if args.threads else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        run = dict(machine=machine(args.device), repeats=args.repeats, offset_std=args.offset_std, amp=args.amp,
                   shapes={})
        targets = AMP_TARGETS if args.amp else TARGETS
        for shape in args.shapes:
            times = time_shape(shape, args.methods, args.repeats, args.device, args.offset_std, args.amp)
            med = {m: statistics.median(v) for m, v in times.items()}
            channels, size, batch = SHAPES[shape]
            entry = dict(channels=channels, size=size, batch=batch, times_s=times, median_s=med,
                         ratio_to_dense={m: med[m] / med['dense'] for m in args.methods}, target=targets.get(shape))
            if not args.no_memory:
                entry['peak_extra_bytes'] = {m: peak_memory(shape, m, args.device, args.offset_std, args.amp)
                                             for m in args.methods}
            run['shapes'][shape] = entry
            print(f'{threads} thread(s) {shape}: ' + ', '.join(f'{m} {med[m] * 1e3:.1f} ms' for m in args.methods),
                  file=sys.stderr)
        runs.append(run)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(command=' '.join(sys.argv), runs=runs), indent=1))
    for run in runs:
        print(markdown(run, args.methods) + '\n')
    print(f'(written to {out})')
    return 0


def markdown(run: dict, methods: list) -> str:
    precision = ', under bfloat16 autocast' if run.get('amp') else ''
    lines = [f"DCNv2 forward+backward{precision}, 3x3 s1 p1, offsets std {run['offset_std']} px, "
             f"{describe(run['machine'])}, "
             f"median of {run['repeats']}, load average before {run['machine']['load_average'][:1]}: time as a "
             f"multiple of dense (dense in ms), peak extra memory in MiB",
             '',
             '| shape | ' + ' | '.join(methods) + ' | target |',
             '|---|' + '---|' * (len(methods) + 1)]
    for shape, e in run['shapes'].items():
        cells = []
        for m in methods:
            cell = f"{e['median_s'][m] * 1e3:.1f} ms" if m == 'dense' else f"{e['ratio_to_dense'][m]:.2f}x"
            if 'peak_extra_bytes' in e:
                cell += f" / {e['peak_extra_bytes'][m] / 2**20:.0f} MiB"
            cells.append(cell)
        lines.append(f"| {shape} ({e['batch']}x{e['channels']}ch@{e['size']}²) | " + ' | '.join(cells)
                     + (f" | ≤ {e['target']}x |" if e['target'] else ' | – |'))
    return '\n'.join(lines)


if __name__ == '__main__':
    sys.exit(main())
