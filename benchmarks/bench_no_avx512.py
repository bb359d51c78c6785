"""The deformable conv kernel on a CPU without AVX-512, simulated on one that has it.

Runs dense and native DCNv2 forward+backward (the shapes and offsets of ``bench_deform_conv.py``, one
thread) in a child process where ATen's kernels are limited to AVX2 (``ATEN_CPU_CAPABILITY=avx2``),
oneDNN's too (``ONEDNN_MAX_CPU_ISA=AVX2``), and dcn_det's compiled kernel is a copy built for
x86-64-v3 (AVX2 + FMA) without its AVX-512 clone. ``--before DIR`` runs a checkout of older dcn_det
code (e.g. ``git worktree add /tmp/before 74c9d67``) in the same conditions, so the two native ops
are compared as ratios to the same dense conv. MKL's sgemm, where used, picks its own code path.

    .venv/bin/python -m benchmarks.bench_no_avx512 [--before /tmp/before] [--repeats 7]
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import tempfile
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SHAPES = {'c3': (128, 64, 2), 'c4': (256, 32, 2), 'c5': (512, 16, 2),
          'demo-c3': (64, 40, 4), 'demo-c4': (128, 20, 4), 'demo-c5': (256, 10, 4)}
ENV = {'ATEN_CPU_CAPABILITY': 'avx2', 'ONEDNN_MAX_CPU_ISA': 'AVX2', 'OMP_NUM_THREADS': '1'}


def build_avx2_kernel(directory: str) -> str:
    """Compile the kernel for x86-64-v3 only into ``directory``; returns the library's path."""
    from torch.utils.cpp_extension import load

    from dcn_det.ops import _ext as extension

    load(name='dcn_det_cpu_avx2', sources=extension.SOURCES, build_directory=directory,
         extra_cflags=[*extension.CFLAGS, '-DDCN_NO_CLONES', '-march=x86-64-v3'], extra_ldflags=['-fopenmp'])
    return osp.join(directory, 'dcn_det_cpu_avx2.so')


def _time(shape: tuple, repeats: int) -> dict:
    """Median ms of dense and native fwd+bwd at one shape (channels, size, batch)."""
    import torch
    import torch.nn.functional as F

    from dcn_det.ops import deform_conv2d

    c, size, n = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, size, size, generator=g).requires_grad_()
    offset = (2.0 * torch.randn(n, 18, size, size, generator=g)).requires_grad_()
    mask = torch.rand(n, 9, size, size, generator=g).requires_grad_()
    w = (torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5).requires_grad_()
    b = torch.randn(c, generator=g).requires_grad_()

    def dense():
        out = F.conv2d(x, w, b, padding=1)
        torch.autograd.grad(out, (x, w, b), torch.ones_like(out))

    def native():
        out = deform_conv2d(x, offset, w, b, padding=1, mask=mask, backend='native')
        torch.autograd.grad(out, (x, offset, mask, w, b), torch.ones_like(out))

    times = {'dense': [], 'native': []}
    dense(), native()
    for _ in range(repeats):
        for key, fn in (('dense', dense), ('native', native)):
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(dense_ms=1e3 * med['dense'], native_ms=1e3 * med['native'], ratio=med['native'] / med['dense'])


def child(code: str, library: str, repeats: int) -> dict:
    """In the AVX2-limited process: time dense and native on every shape, with the code of checkout ``code``."""
    import torch

    sys.path.insert(0, code)  # that checkout's dcn_det, not the installed one
    if library:
        import importlib.util

        from dcn_det.ops import _ext as extension

        spec = importlib.util.spec_from_file_location('dcn_det_cpu_avx2', library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        extension.load = lambda: module
    torch.set_num_threads(1)
    return dict(cpu_capability=torch.backends.cpu.get_cpu_capability(),
                shapes={name: _time(shape, repeats) for name, shape in SHAPES.items()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--before', help='a checkout of older dcn_det code to compare with')
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--out', default=osp.join(REPO, 'work_dirs', 'bench', 'no_avx512.json'))
    parser.add_argument('--child', nargs=2, metavar=('CODE', 'LIBRARY'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error('--repeats must be >= 1')
    if args.before and not osp.isfile(osp.join(args.before, 'dcn_det', '__init__.py')):
        parser.error(f'--before {args.before!r} is not a dcn_det checkout (no dcn_det/__init__.py)')
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.repeats)))
        return 0
    from benchmarks._machine import describe, machine

    with tempfile.TemporaryDirectory() as tmp:
        library = build_avx2_kernel(tmp)
        runs = {}
        for label, code, lib in [('now', REPO, library)] + ([('before', args.before, '')] if args.before else []):
            out = subprocess.run([sys.executable, '-m', 'benchmarks.bench_no_avx512', '--repeats', str(args.repeats),
                                  '--child', code, lib], cwd=REPO, env=dict(os.environ, **ENV), capture_output=True,
                                 text=True, check=True)
            runs[label] = json.loads(out.stdout.strip().splitlines()[-1])
    result = dict(machine=machine(), simulated=ENV, runs=runs)
    os.makedirs(osp.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    labels = list(runs)
    print(f"DCNv2 fwd+bwd on {describe(result['machine'])}, limited to AVX2 "
          f"(capability seen: {runs['now']['cpu_capability']}), 1 thread, median of {args.repeats}\n")
    print('| shape | dense ms | ' + ' | '.join(f'native {k} (× dense)' for k in labels) + ' |')
    print('| --- | --- |' + ' --- |' * len(labels))
    for name in SHAPES:
        cells = ' | '.join(f"{runs[k]['shapes'][name]['native_ms']:.1f} ms ({runs[k]['shapes'][name]['ratio']:.2f}×)"
                           for k in labels)
        print(f"| {name} | {runs['now']['shapes'][name]['dense_ms']:.1f} | {cells} |")
    print(f'\n(written to {args.out})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
