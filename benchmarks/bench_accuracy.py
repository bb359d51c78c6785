"""Accuracy on the shapes data: plain vs DCN variants, same schedule, several seeds -> bbox mAP mean ± std.

    .venv/bin/python benchmarks/bench_accuracy.py [--variants plain dcnv2] [--seeds 0 1 2] [--epochs 6]

Trains configs/shapes_r18_<variant>.py with tools/train.py for each seed (model init and data order;
the data set is the same: data/shapes, generated with seed 0 if absent) and evaluates the final
checkpoint with tools/test.py on the val split. Work dirs: work_dirs/bench/accuracy/<variant>_s<seed>
(an existing finished run is reused, not retrained). Writes work_dirs/bench/accuracy.json.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--variants', nargs='+', default=['plain', 'mdconv', 'mdpool', 'dcnv2'])
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=6, help='the demo schedule by default')
    parser.add_argument('--data', default='data/shapes')
    parser.add_argument('--out', default=osp.join(REPO, 'work_dirs', 'bench', 'accuracy.json'))
    args = parser.parse_args()
    if not osp.isdir(osp.join(REPO, args.data)):
        run('tools/make_demo_data.py', '--out', args.data)
    results = {}
    for variant in args.variants:
        config = f'configs/shapes_r18_{variant}.py'
        for seed in args.seeds:
            work = osp.join('work_dirs', 'bench', 'accuracy', f'{variant}_s{seed}_e{args.epochs}')
            final = osp.join(REPO, work, f'epoch_{args.epochs}.pth')
            start = time.time()
            options = ['--cfg-options', f'randomness.seed={seed}', f'train_cfg.max_epochs={args.epochs}',
                       f'train_cfg.val_interval={args.epochs}', f'train_dataloader.dataset.data_root={args.data}/',
                       f'val_dataloader.dataset.data_root={args.data}/',
                       f'test_dataloader.dataset.data_root={args.data}/',
                       f'test_evaluator.ann_file={args.data}/annotations/instances_val.json']
            if not osp.exists(final):
                run('tools/train.py', config, '--work-dir', work, '--resume', *options)
            metrics_file = osp.join(REPO, work, 'test_metrics.json')
            if osp.exists(metrics_file):
                os.remove(metrics_file)
            run('tools/test.py', config, final, '--work-dir', work, *options)
            with open(metrics_file) as f:
                metrics = json.load(f)['metrics']
            results.setdefault(variant, []).append(
                dict(seed=seed, mAP=metrics['coco/bbox_mAP'], mAP50=metrics['coco/bbox_mAP_50'],
                     minutes=(time.time() - start) / 60))
            print(f'{variant} seed {seed}: bbox mAP {metrics["coco/bbox_mAP"]:.3f}', flush=True)
    summary = {v: dict(runs=r, mean=statistics.mean(x['mAP'] for x in r),
                       std=statistics.stdev(x['mAP'] for x in r) if len(r) > 1 else 0.0,
                       mean50=statistics.mean(x['mAP50'] for x in r)) for v, r in results.items()}
    os.makedirs(osp.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(dict(epochs=args.epochs, seeds=args.seeds, data=args.data, variants=summary), f, indent=2)
    print(f'\nshapes val, {args.epochs} epochs, seeds {args.seeds}\n')
    print('| variant | bbox mAP (mean ± std) | mAP@50 (mean) |')
    print('| --- | --- | --- |')
    for v, s in summary.items():
        print(f"| {v} | {100 * s['mean']:.1f} ± {100 * s['std']:.1f} | {100 * s['mean50']:.1f} |")


if __name__ == '__main__':
    main()
