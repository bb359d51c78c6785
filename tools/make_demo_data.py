"""Write the synthetic shapes dataset that `make demo` trains on (COCO format, deterministic from a seed).

Usage, from the repository root::

    python tools/make_demo_data.py --out data/shapes                      # 400 train / 100 val, 320x320
    python tools/make_demo_data.py --out data/shapes2 --classes heart,crescent,arrow,chevron --seed 1

It writes ``<out>/{train,val}/*.png``, ``<out>/annotations/instances_{train,val}.json`` and
``<out>/preview.png``, and refuses to touch an existing non-empty ``<out>`` unless ``--overwrite``.
A config consumes it with::

    metainfo = dict(classes=('ellipse', 'triangle', 'star', 'cross', 'ring'))
    train_dataloader = dict(dataset=dict(
        data_root='data/shapes/', metainfo=metainfo,
        ann_file='annotations/instances_train.json', data_prefix=dict(img='train/')))
"""
import argparse
import sys
from pathlib import Path

from dcn_det.data.synthetic import DEFAULT_CLASSES, SHAPES, generate


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='data/shapes', help='dataset folder (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=100)
    parser.add_argument('--image-size', type=int, default=320, help='side of the square images, in pixels')
    parser.add_argument('--min-size', type=int, default=16, help='smallest object size, in pixels')
    parser.add_argument('--max-size', type=int, default=128, help='largest object size, at most image-size/2')
    parser.add_argument('--classes', default=','.join(DEFAULT_CLASSES),
                        help=f'comma-separated shape names from {", ".join(SHAPES)} (default: %(default)s)')
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
    return parser, parser.parse_args(argv)


def _progress(split: str, done: int, total: int) -> None:
    if done == total or done % 50 == 0:
        print(f'{split}: {done}/{total} images', file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser, args = parse_args(argv)
    classes = tuple(name.strip() for name in args.classes.split(',') if name.strip())
    try:
        summary = generate(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                           image_size=args.image_size, classes=classes, min_size=args.min_size,
                           max_size=args.max_size, overwrite=args.overwrite, progress=_progress)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    images, objects = summary['images'], summary['objects']
    print(f"wrote {summary['out_dir']}: {images['train']} train / {images['val']} val images, "
          f"{objects['train']} / {objects['val']} objects, {summary['image_size']}px, seed {summary['seed']}")
    print('objects per class: ' + ', '.join(f'{k} {v}' for k, v in summary['objects_per_class'].items()))
    low, high = summary['box_size_px']
    print(f"box size (sqrt(w*h)) {low}-{high}px ({summary['scale_ratio']}x), aspect (w/h) "
          f"{summary['box_aspect_range'][0]}-{summary['box_aspect_range'][1]}, "
          f"{summary['occluded_share']:.0%} of objects partly hidden (least visible "
          f"{summary['min_visibility']:.0%}), {summary['overlapping_box_pairs']} overlapping box pairs")
    print(f"look at {Path(summary['out_dir']) / 'preview.png'}")
    return summary


if __name__ == '__main__':
    main()
