"""The main job (`make demo`): generate the shapes data if absent, train the DCNv2 demo model, evaluate.

    python tools/demo.py [--config configs/shapes_r18_dcnv2.py] [--data data/shapes]

Runs tools/make_demo_data.py, tools/train.py (resuming if the work dir already holds a run),
tools/test.py on the final checkpoint (COCO bbox mAP) and tools/visualize_offsets.py on a val image.
On a CPU with AMX-BF16 it trains and tests with ``--amp`` (bfloat16 mixed precision: the same mAP
within 1, in less time; docs/speed.md), and says so in its first line; ``--no-amp`` / ``--amp`` choose.
"""
import argparse
import os
import os.path as osp
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run(*args: str) -> None:
    print(f'\n$ {" ".join(args)}', flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def default_amp() -> bool:
    """--amp by default where the CPU has AMX-BF16 and no GPU trains instead (train.py's --amp is then float16)."""
    import torch

    from dcn_det.ops import cpu_flags

    return not torch.cuda.is_available() and 'amx_bf16' in cpu_flags()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default='configs/shapes_r18_dcnv2.py')
    parser.add_argument('--data', default='data/shapes')
    parser.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                        help='bfloat16 mixed precision (default: on a CPU with AMX-BF16)')
    args = parser.parse_args(argv)
    amp = ['--amp'] if (args.amp if args.amp is not None else default_amp()) else []
    print(f'demo: {"bfloat16 mixed precision (--amp)" if amp else "float32"}'
          + (' (this CPU has AMX-BF16)' if args.amp is None and amp else ''), flush=True)
    name = osp.splitext(osp.basename(args.config))[0]
    work_dir = osp.join('work_dirs', name)
    start = time.time()
    if not osp.isdir(osp.join(REPO, args.data)):
        run('tools/make_demo_data.py', '--out', args.data)
    resume = ['--resume'] if osp.exists(osp.join(REPO, work_dir, 'last_checkpoint')) else []
    run('tools/train.py', args.config, '--work-dir', work_dir, *resume, *amp)
    with open(osp.join(REPO, work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    run('tools/test.py', args.config, checkpoint, '--work-dir', work_dir, *amp)
    picture = osp.join(work_dir, 'offsets.png')
    if not osp.exists(osp.join(REPO, picture)):
        image = osp.join(args.data, 'val', sorted(os.listdir(osp.join(REPO, args.data, 'val')))[0])
        run('tools/visualize_offsets.py', args.config, checkpoint, image, '--out', picture)
    print(f'\ndemo done in {(time.time() - start) / 60:.1f} min: metrics in {work_dir}/test_metrics.json, '
          f'learned offsets in {picture}')


if __name__ == '__main__':
    main()
