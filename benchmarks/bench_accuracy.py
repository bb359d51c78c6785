"""Accuracy on the shapes data: plain vs DCN variants, same schedule, several seeds -> bbox mAP mean ± std.

    .venv/bin/python -m benchmarks.bench_accuracy [--variants plain mdconv mdpool dcnv2] [--seeds 0 1 2]
        [--epochs 12] [--jobs N] [--test-data DIR] [--work-root work_dirs/bench/accuracy]
        [--out work_dirs/bench/accuracy.json] [--plot work_dirs/bench/accuracy.png]

Trains configs/shapes_r18_<variant>.py with tools/train.py for each seed (the seed sets model init and
data order; the data set is the same for every run: data/shapes, generated with seed 0 if absent) and
evaluates the final checkpoint with tools/test.py on the val split (COCO bbox AP, pycocotools), or on
the val split of ``--test-data``. ``--epochs`` stretches the demo's schedule, lr drop included.

Runs go seed by seed, variants interleaved, ``--jobs`` at a time (default: one per core), each with
``cores / jobs`` torch threads. The thread count is recorded: it changes the float summation order,
so a run is reproducible with the same count. One run per core is faster than one run using every
core, as ``benchmarks/bench_parallel_runs.sh`` measures (docs/accuracy.md has its figures).

Work dirs: <--work-root>/<variant>_s<seed>_e<epochs>. A finished run (its ``result.json``)
is reused, not retrained; a run killed mid-way resumes from its last checkpoint. The JSON is rewritten
after every run, so a partial study is never lost. Reported per variant: bbox mAP, AP50, AP75, AP of
small and medium objects (mean ± sample std over seeds), training minutes, and for each DCN variant
its paired difference to plain (same seed), with the number of seeds on which it wins.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Dict, List, Optional, Sequence

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
METRICS = {'mAP': 'coco/bbox_mAP', 'mAP50': 'coco/bbox_mAP_50', 'mAP75': 'coco/bbox_mAP_75',
           'mAP_s': 'coco/bbox_mAP_s', 'mAP_m': 'coco/bbox_mAP_m'}
BASELINE = 'plain'


def available_variants() -> List[str]:
    names = os.listdir(osp.join(REPO, 'configs'))
    return sorted(n[len('shapes_r18_'):-3] for n in names if n.startswith('shapes_r18_') and n.endswith('.py'))


def plan(variants: Sequence[str], seeds: Sequence[int]) -> List[tuple]:
    """``(variant, seed)`` pairs, seed by seed with the variants interleaved: with ``--jobs 2`` the
    variants being compared run side by side, and a study cut short has every variant at the first seeds."""
    return [(v, s) for s in seeds for v in variants]


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    return dict(mean=statistics.mean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: Sequence[dict]) -> Dict[str, dict]:
    """Per variant, in first-seen order: each metric's mean and sample std over the runs, and for every
    variant but plain, its difference to plain paired by seed (seeds without a plain run are left out).

    Args:
        runs: dicts with ``variant``, ``seed``, the keys of :data:`METRICS` and ``minutes`` (training
            time; None for a run resumed after a kill, left out of the time's mean).
    """
    by_variant: Dict[str, Dict[int, dict]] = {}
    for r in runs:
        seeds = by_variant.setdefault(r['variant'], {})
        if r['seed'] in seeds:
            raise ValueError(f"two runs of {r['variant']} with seed {r['seed']}")
        seeds[r['seed']] = r
    base = by_variant.get(BASELINE, {})
    summary = {}
    for variant, seeds in by_variant.items():
        entry = dict(seeds=sorted(seeds), runs=[seeds[s] for s in sorted(seeds)])
        for key in METRICS:
            entry[key] = _mean_std([r[key] for r in entry['runs']])
        timed = [r['minutes'] for r in entry['runs'] if r['minutes'] is not None]
        entry['minutes'] = _mean_std(timed) if timed else None
        paired = [s for s in entry['seeds'] if s in base]
        if variant != BASELINE and paired:
            diffs = [seeds[s]['mAP'] - base[s]['mAP'] for s in paired]
            entry['vs_plain'] = dict(_mean_std(diffs), seeds=paired, wins=sum(d > 0 for d in diffs))
        summary[variant] = entry
    return summary


def table(summary: Dict[str, dict]) -> str:
    """The README's table: percentages, mean ± std over seeds."""
    def pct(m: dict) -> str:
        return f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}"

    def minutes(m: Optional[dict]) -> str:
        return f"{m['mean']:.1f}" if m else '–'

    lines = ['| variant | seeds | bbox mAP | Δ mAP vs plain (paired) | AP50 | AP75 | AP small | AP medium '
             '| train min |', '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for v, s in summary.items():
        vs = s.get('vs_plain')
        delta = f"{100 * vs['mean']:+.1f} ± {100 * vs['std']:.1f} ({vs['wins']}/{len(vs['seeds'])} wins)" \
            if vs else '–'
        lines.append(f"| {v} | {len(s['seeds'])} | **{pct(s['mAP'])}** | {delta} | {pct(s['mAP50'])} | "
                     f"{pct(s['mAP75'])} | {pct(s['mAP_s'])} | {pct(s['mAP_m'])} | {minutes(s['minutes'])} |")
    return '\n'.join(lines)


def _run_tool(log, *args: str, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log.write(f'\n$ {" ".join(args)}\n')
    log.flush()
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f'{" ".join(args[:2])} failed (exit {done.returncode}): see {log.name}')


def run_one(variant: str, seed: int, epochs: int, data: str, threads: int, work_root: str,
            test_data: Optional[str] = None) -> dict:
    """Train (or resume) one run in ``<work_root>/<variant>_s<seed>_e<epochs>`` on ``data`` and test it on
    the val split of ``test_data`` (default ``data``); returns its record, also kept in the work dir as
    ``result.json`` (``result_<test_data name>.json`` for another test set). A run with one is not run again.
    """
    test_data = test_data or data
    work = osp.join(work_root, f'{variant}_s{seed}_e{epochs}')
    result_file = osp.join(work, 'result.json' if test_data == data else f'result_{osp.basename(test_data)}.json')
    if osp.exists(result_file):
        with open(result_file) as f:
            return json.load(f)
    config = f'configs/shapes_r18_{variant}.py'
    # The demo's schedule stretched to `epochs`: the lr drops x0.1 for the last epoch (its MultiStepLR).
    train = ['--cfg-options', f'randomness.seed={seed}', f'train_cfg.max_epochs={epochs}',
             f'train_cfg.val_interval={epochs}', f'param_scheduler.1.end={epochs}',
             f'param_scheduler.1.milestones=[{epochs - 1}]', f'train_dataloader.dataset.data_root={data}/',
             f'val_dataloader.dataset.data_root={data}/',
             f'val_evaluator.ann_file={data}/annotations/instances_val.json']
    test = ['--cfg-options', f'test_dataloader.dataset.data_root={test_data}/',
            f'test_evaluator.ann_file={test_data}/annotations/instances_val.json']
    os.makedirs(work, exist_ok=True)
    final = osp.join(work, f'epoch_{epochs}.pth')
    metrics_file = osp.join(work, 'test_metrics.json')
    minutes = None  # training time, when all of it ran here (not resumed after a kill, not trained earlier)
    with open(osp.join(work, 'bench.log'), 'a') as log:
        if not osp.exists(final):
            resumed = osp.exists(osp.join(work, 'last_checkpoint'))
            start = time.time()
            _run_tool(log, 'tools/train.py', config, '--work-dir', work, '--resume', *train, threads=threads)
            minutes = None if resumed else (time.time() - start) / 60
        if osp.exists(metrics_file):
            os.remove(metrics_file)  # tools/test.py rewrites it; never read a stale one
        _run_tool(log, 'tools/test.py', config, final, '--work-dir', work, *test, threads=threads)
    with open(metrics_file) as f:
        metrics = json.load(f)['metrics']
    record = dict(variant=variant, seed=seed, epochs=epochs, threads=threads, minutes=minutes,
                  test_data=test_data, **{k: metrics[v] for k, v in METRICS.items()})
    _dump(record, result_file)
    return record


def _dump(obj: dict, path: str) -> None:
    """Write JSON atomically: a study killed mid-write keeps the previous file."""
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=2)
    os.replace(path + '.tmp', path)


def write(path: str, args: argparse.Namespace, runs: List[dict], failed: List[str]) -> dict:
    result = dict(epochs=args.epochs, seeds=args.seeds, data=args.data, test_data=args.test_data or args.data,
                  jobs=args.jobs,
                  complete=len(runs) == len(args.variants) * len(args.seeds), failed=failed,
                  variants=summarize(sorted(runs, key=lambda r: (args.variants.index(r['variant']), r['seed']))))
    _dump(result, path)
    return result


def plot(result: dict, path: str) -> None:
    """bbox mAP per variant (each seed a dot, mean ± std a bar) and training minutes per run."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    variants = result['variants']
    names = list(variants)
    fig, (ax_map, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for i, name in enumerate(names):
        v = variants[name]
        ax_map.bar(i, 100 * v['mAP']['mean'], yerr=100 * v['mAP']['std'], capsize=5, color='#9ecae1')
        ax_map.plot([i] * len(v['runs']), [100 * r['mAP'] for r in v['runs']], 'ko', ms=4)
        if v['minutes']:
            ax_time.bar(i, v['minutes']['mean'], yerr=v['minutes']['std'], capsize=5, color='#fdae6b')
    for ax, label in ((ax_map, 'bbox mAP (%), val'), (ax_time, 'training minutes per run')):
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(label)
    seeds = sorted({s for v in variants.values() for s in v['seeds']})
    fig.suptitle(f"shapes data, {result['epochs']} epochs, seeds {seeds} (dots: one seed each)")
    fig.tight_layout()
    os.makedirs(osp.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo_epochs() -> int:
    """The demo config's number of epochs."""
    from mmengine.config import Config

    return Config.fromfile(osp.join(REPO, 'configs', '_base_', 'shapes_r18_cpu.py')).train_cfg.max_epochs


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--variants', nargs='+', default=['plain', 'mdconv', 'mdpool', 'dcnv2'],
                        help='configs/shapes_r18_<variant>.py (default: %(default)s)')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=demo_epochs(),
                        help="the demo's schedule (%(default)s) by default; the lr drop moves with it to the last "
                             'epoch')
    parser.add_argument('--jobs', type=int, help='runs at a time, sharing the cores (default: one per core, '
                        'at most one per run)')
    parser.add_argument('--data', default='data/shapes', help='trained on its train split (default: %(default)s)')
    parser.add_argument('--test-data', help='tested on its val split (default: --data); e.g. a larger set made '
                        'by tools/make_demo_data.py with another --seed')
    parser.add_argument('--work-root', default=osp.join(REPO, 'work_dirs', 'bench', 'accuracy'),
                        help='one work dir per run below it (default: %(default)s)')
    parser.add_argument('--out', default=osp.join(REPO, 'work_dirs', 'bench', 'accuracy.json'))
    parser.add_argument('--plot', default=osp.join(REPO, 'work_dirs', 'bench', 'accuracy.png'))
    args = parser.parse_args(argv)
    known = available_variants()
    unknown = [v for v in args.variants if v not in known]
    if unknown:
        parser.error(f'no config for variant(s) {", ".join(unknown)}: choose from {", ".join(known)} '
                     '(configs/shapes_r18_<variant>.py)')
    for flag, values in (('--variants', args.variants), ('--seeds', args.seeds)):
        if len(set(values)) != len(values):
            parser.error(f'{flag} names a value twice: {values}')
    todo = plan(args.variants, args.seeds)
    if args.jobs is None:
        args.jobs = min(os.cpu_count() or 1, len(todo))
    if args.jobs < 1 or args.epochs < 1:
        parser.error('--jobs and --epochs must be at least 1')
    if args.test_data and not osp.isfile(osp.join(REPO, args.test_data, 'annotations', 'instances_val.json')):
        parser.error(f'--test-data {args.test_data} has no annotations/instances_val.json: make one with '
                     f'tools/make_demo_data.py --out {args.test_data} --seed 1')
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if not osp.isdir(osp.join(REPO, args.data)):
        subprocess.run([sys.executable, 'tools/make_demo_data.py', '--out', args.data], cwd=REPO, check=True)

    runs: List[dict] = []
    failed: List[str] = []
    print(f'{len(todo)} runs ({args.epochs} epochs each), {args.jobs} at a time, {threads} thread(s) each',
          flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_one, v, s, args.epochs, args.data, threads, args.work_root,
                               args.test_data): (v, s) for v, s in todo}
        for future in as_completed(futures):
            variant, seed = futures[future]
            try:
                record = future.result()
            except RuntimeError as e:
                failed.append(f'{variant} seed {seed}: {e}')
                print(failed[-1], file=sys.stderr, flush=True)
                continue
            runs.append(record)
            write(args.out, args, runs, failed)
            took = f"{record['minutes']:.1f} min" if record['minutes'] is not None else 'trained earlier, not timed'
            print(f"{variant} seed {seed}: bbox mAP {100 * record['mAP']:.1f} ({took}) [{len(runs)}/{len(todo)}]",
                  flush=True)
    result = write(args.out, args, runs, failed)
    if runs:
        plot(result, args.plot)
        print(f"\nshapes val, {args.epochs} epochs, seeds {args.seeds}\n\n{table(result['variants'])}\n\n"
              f'written to {args.out} and {args.plot}')
    if failed:
        sys.exit(f'{len(failed)} run(s) failed:\n' + '\n'.join(failed))
    return result


if __name__ == '__main__':
    main()
