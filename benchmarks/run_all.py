"""`make bench`: run every benchmark, then write work_dirs/bench/summary.json and summary.png.

Each benchmark also runs alone (its own --help); this script only calls them in turn with their
defaults and gathers their JSON. Pass --quick for a smoke run (fewer repeats, seeds and epochs). Not
here, as they need more than the repo: ``benchmarks.bench_no_avx512 --before DIR`` (an older checkout)
and ``benchmarks.bench_onnx agreement --checkpoint CKPT`` (a trained demo checkpoint).
"""
import argparse
import json
import os.path as osp
import subprocess
import sys

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
BENCH = osp.join(REPO, 'work_dirs', 'bench')

# name: (python's arguments that run it, its quick-run options)
RUNS = {
    'deform_conv': (['-m', 'benchmarks.bench_deform_conv'], ['--repeats', '3']),
    'deform_roi_pool': (['-m', 'benchmarks.bench_deform_roi_pool'], ['--repeats', '3']),
    'models': (['-m', 'benchmarks.bench_models'], ['--repeats', '1', '--size', '320']),
    'train_step_demo': (['-m', 'benchmarks.bench_train_step'], ['--repeats', '1', '--no-profile']),
    'onnx_latency': (['-m', 'benchmarks.bench_onnx', 'latency'],
                     ['--models', 'demo (R18 DCNv2, 320²)', '--repeats', '1']),
    'digits': (['-m', 'benchmarks.bench_digits'], ['--quick']),
    'accuracy': (['-m', 'benchmarks.bench_accuracy'],
                 ['--seeds', '0', '--epochs', '2', '--variants', 'plain', 'dcnv2']),
}


def plot(summary: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    models = summary.get('models', {}).get('variants', {})
    if models:
        names = list(models)
        axes[0].bar(range(len(names)), [models[n]['train_ratio'] for n in names], label='train step')
        axes[0].bar([i + 0.4 for i in range(len(names))], [models[n]['infer_ratio'] for n in names], width=0.4,
                    label='inference')
        axes[0].axhline(1.3, color='k', ls='--', lw=1, label='target 1.3x')
        axes[0].set_xticks(range(len(names)), [n.replace(', ', '\n') for n in names], fontsize=7)
        axes[0].set_ylabel('time / plain (same run)')
        axes[0].set_title(f"Faster R-CNN R50-FPN, {summary['models']['device']}")
        axes[0].legend(fontsize=8)
    accuracy = summary.get('accuracy', {}).get('variants', {})
    if accuracy:
        names = list(accuracy)
        axes[1].bar(names, [100 * accuracy[n]['mAP']['mean'] for n in names],
                    yerr=[100 * accuracy[n]['mAP']['std'] for n in names], capsize=4)
        axes[1].set_ylabel('bbox mAP (%)')
        axes[1].set_title(f"shapes val, {summary['accuracy']['epochs']} epochs, "
                          f"{len(summary['accuracy']['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--only', nargs='+', choices=list(RUNS), default=list(RUNS))
    args = parser.parse_args(argv)
    summary = {}
    for name in args.only:
        module, quick = RUNS[name]
        cmd = [sys.executable, *module, *(quick if args.quick else [])]
        print(f'\n$ {" ".join(cmd[1:])}', flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
        with open(osp.join(BENCH, f'{name}.json')) as f:
            summary[name] = json.load(f)
    with open(osp.join(BENCH, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    plot(summary, osp.join(BENCH, 'summary.png'))
    print(f'\nwritten to {BENCH}/summary.json and summary.png')


if __name__ == '__main__':
    main()
