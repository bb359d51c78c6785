"""Draw where a detector's deformable convs sample, as the DCN papers' figures do (DCNv1 Fig. 5).

    python tools/visualize_offsets.py CONFIG CHECKPOINT IMAGE [--out PNG] [--layers NAME ...]
        [--points X,Y ...] [--trust-checkpoint]

For an activation unit of the top chosen layer, its 3x3 sampling locations are followed down through
the other chosen layers (9, 81, 729 points for three layers) and drawn on the image, one colour per
layer; with DCNv2, a point's opacity and size follow the product of the masks along its path.

Defaults: the backbone's last 3 deformable layers (R50 c3-c5: ``backbone.layer4.{0,1,2}.conv2``;
R18: ``backbone.layer3.1.conv2``, ``backbone.layer4.{0,1}.conv2``), and one panel each for the image
centre and the box centres of the 3 best detections scoring at least ``--score-thr``. ``--points``
are ``X,Y`` pixels of IMAGE as an image viewer shows them. The PNG goes to
``work_dirs/<config name>/offsets_<image name>.png`` and is never overwritten. Also printed: each
layer's mean |offset| in pixels of the network input, 0 for a layer that learnt nothing.
"""
import argparse
import os
import os.path as osp

from dcn_det.checkpoint import CheckpointLoadError, build_detector, load_weights
from dcn_det.cli import DictAction, UsageError, fail, load_config


def point(text: str):
    try:
        x, y = (float(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a point: write X,Y, e.g. 320,240') from None
    return x, y


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Draw the sampling locations of deformable convs')
    parser.add_argument('config', help='detector config file')
    parser.add_argument('checkpoint', help='checkpoint of that detector')
    parser.add_argument('image', help='image to run the detector on')
    parser.add_argument('--out', help='PNG to write (must not exist; default '
                                      'work_dirs/<config name>/offsets_<image name>.png)')
    parser.add_argument('--layers', nargs='+', metavar='NAME',
                        help='deformable layers to compose, e.g. backbone.layer4.2.conv2 '
                             '(default: the last 3 of the backbone)')
    parser.add_argument('--points', nargs='+', type=point, metavar='X,Y',
                        help='image pixels to explain (default: image centre and the best detections)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detections scoring at least this give default points (default 0.3)')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='allow a checkpoint that pickles Python objects (can run code)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (mmengine syntax)')
    return parser.parse_args(argv)


def check_out(out: str) -> None:
    if not out.lower().endswith('.png'):
        raise UsageError(f'--out {out!r} must end in .png')
    if osp.exists(out):
        raise UsageError(f'{out!r} exists: remove it or choose another --out')


def main(argv=None) -> str:
    args = parse_args(argv)
    try:
        if args.out is not None:
            check_out(args.out)
        if not osp.isfile(args.image):
            raise UsageError(f'image {args.image!r} does not exist')
        import mmcv

        try:
            image = mmcv.imread(args.image)  # BGR, as mmdet's pipeline expects
        except Exception as e:
            raise UsageError(f'cannot read image {args.image!r}: {e}') from None
        if image is None:
            raise UsageError(f'{args.image!r} is not an image file that OpenCV can read')
        h, w = image.shape[:2]
        for x, y in args.points or ():
            if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
                raise UsageError(f'point {x:g},{y:g} is outside the {w}x{h} image: give X,Y with '
                                 f'0 <= X <= {w - 1} and 0 <= Y <= {h - 1}')
        cfg = load_config(args.config, args.cfg_options)
        out = args.out
        if out is None:
            out = osp.join(cfg.work_dir, f'offsets_{osp.splitext(osp.basename(args.image))[0]}.png')
            check_out(out)

        from dcn_det import visualization as vis

        try:
            model = build_detector(cfg)
            layers = vis.select_layers(model, args.layers)  # before the weights: a bad name fails fast
            load_weights(model, args.checkpoint, trust=args.trust_checkpoint)
        except ValueError as e:
            raise UsageError(str(e)) from None
    except (UsageError, CheckpointLoadError) as e:
        fail(str(e))

    maps, result = vis.capture(model, image, layers)
    scale_factor = result.metainfo.get('scale_factor', (1.0, 1.0))
    for m in maps:
        mask = f', mean mask {m.mask.mean():.3f}' if m.mask is not None else ''
        print(f'{m.name}: output stride {m.out_stride[0]}, mean |offset| {m.mean_abs_offset():.3f} px{mask}')
    classes = model.dataset_meta.get('classes', ())
    if args.points:
        points = [('point', (y, x)) for x, y in args.points]
    else:
        points = vis.default_points(result, (h, w), classes, score_thr=args.score_thr)
    panels = vis.make_panels(maps, points, scale_factor)
    for p in panels:
        print(f'{p.label} at x={p.point[1]:.0f}, y={p.point[0]:.0f}: unit (row {p.unit[0]}, col {p.unit[1]}) '
              f'of {maps[-1].name}, {len(p.levels[-1][0])} sampling points')
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    names = [m.name.removeprefix('backbone.') for m in maps]
    vis.plot_sampling(image[..., ::-1], panels, names, out,
                      f'{osp.basename(args.config)}\nsampling locations of {" -> ".join(reversed(names))}')
    print(f'wrote {out}')
    return out


if __name__ == '__main__':
    main()
