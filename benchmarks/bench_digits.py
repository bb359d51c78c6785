"""The classic experiment with our op: regular vs deformable (DCNv1, DCNv2) convs on digits at random scales.

    .venv/bin/python -m benchmarks.bench_digits [--seeds 0 1 2] [--epochs 12] [--quick]
        [--out work_dirs/bench/digits.json] [--plot work_dirs/bench/digits.png]

Data (``benchmarks/scaled_digits.py``): scikit-learn's 1797 8x8 digits, split 2:1 train/test
(stratified, fixed by ``--data-seed``), each drawn at a log-uniform random scale (default 0.5-2x of
16 px, i.e. 8-32 px) and random position on a 40x40 canvas. The training digits are drawn afresh
every epoch (a new scale and position per digit, from the run's seed and the epoch); the test set is
drawn once, ``--test-copies`` times per test digit, at random scales from the same range, and is the
same for every variant and seed.

Model: four 3x3 conv-BN-ReLU layers (16, 32, 64, 64 channels; 2x2 max-pool after the first two),
global average pooling and one linear layer, so that no weight is tied to a position. The variants
differ only in the last ``--deform-layers`` convs: ``nn.Conv2d`` (regular),
``dcn_det.models.DeformConv2dPack`` (DCNv1) or ``dcn_det.models.ModulatedDeformConv2dPack`` (DCNv2), all
without bias (BN follows). Paired runs: for one seed every variant starts from the same conv, BN and
linear weights (the offset predictors are zero-initialised, so DCNv1 starts as the regular net and
DCNv2 as the regular net with those layers halved), sees the same training images in the same order,
and uses the same optimiser: AdamW (lr ``--lr``, weight decay 1e-4), batch 64, one-cycle schedule
(15% warm-up, cosine decay), with the offset/mask predictors at ``--offset-lr-mult`` x the lr (0.1, as
in the DCNv2 paper). ``--variants dilated`` adds a control: regular convs with dilation 2 in the
deformable layers' place, a fixed wider grid with no extra parameters.

Reported per variant: test accuracy mean +- std (sample std) over seeds, accuracy per scale third
(small / middle / large digits), train time per epoch (``--threads``, default 1, so that the number
moves less with other jobs on the machine), and, as a diagnostic of whether the offsets adapt to scale,
the mean radial offset of the last deformable layer on the digit (how far, in pixels of that layer's
10x10 map, the 8 outer kernel points move away from the centre, averaged over the cells inside the
digit's box; > 0 is a wider grid, +1 about what dilation 2 gives) per scale third.

Published numbers (``PUBLISHED``), shown beside ours: they are *not* the same protocol. The scaled-MNIST
pair (felixlaumon/deform-conv, a Keras reproduction of Dai et al. 2017) trains the regular CNN on
unscaled MNIST only and then fine-tunes only the offsets of the deformable CNN on scale-augmented MNIST
(zoom 1-2.5x), so the regular CNN never sees a scaled digit. Here every variant trains on scaled digits.
The CIFAR-10 triple (conv / DCNv1 / DCNv2) is quoted as published; its protocol is not known here.
"""
import argparse
import json
import math
import os
import os.path as osp
import statistics
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.scaled_digits import load_digit_images, render_scaled, split_indices
from dcn_det.models import DeformConv2dPack, ModulatedDeformConv2dPack

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
VARIANTS = ('regular', 'dcnv1', 'dcnv2')
# A control, not run by default: the deformable layers' place taken by regular convs with dilation 2,
# i.e. a fixed, wider grid (what a uniform +1 px radial offset would give).
CONTROLS = ('dilated',)
PACKS = {'dcnv1': DeformConv2dPack, 'dcnv2': ModulatedDeformConv2dPack}
CHANNELS = (16, 32, 64, 64)
CANVAS, NOMINAL = 40, 16.0
BATCH = 64
# Reference points, percent test accuracy (see the module docstring for how their protocols differ).
PUBLISHED = {
    'scaled MNIST (reproduction)': {'regular': 57.01, 'dcnv1': 92.55},
    'CIFAR-10': {'regular': 55.4, 'dcnv1': 67.2, 'dcnv2': 69.9},
}
SCALE_BINS = ('small', 'middle', 'large')


class DigitNet(nn.Module):
    """conv-BN-ReLU x4 (max-pool after the first two), global average pool, linear.

    Shapes: x (Tensor[N, 1, 40, 40]) -> logits (Tensor[N, 10]).
    """

    def __init__(self, variant: str = 'regular', deform_layers: int = 2) -> None:
        super().__init__()
        if variant not in VARIANTS + CONTROLS:
            raise ValueError(f'variant must be one of {VARIANTS + CONTROLS}, got {variant!r}')
        if not 0 <= deform_layers <= len(CHANNELS):
            raise ValueError(f'deform_layers must be in [0, {len(CHANNELS)}], got {deform_layers}')
        layers = []
        c_in = 1
        for i, c_out in enumerate(CHANNELS):
            if variant == 'regular' or i < len(CHANNELS) - deform_layers:
                conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
            elif variant == 'dilated':
                conv = nn.Conv2d(c_in, c_out, 3, padding=2, dilation=2, bias=False)
            else:
                conv = PACKS[variant](c_in, c_out, 3, padding=1, bias=False)
            block = [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            if i < 2:
                block.append(nn.MaxPool2d(2))
            layers.append(nn.Sequential(*block))
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layers(x).mean((2, 3)))

    def offset_convs(self) -> list[nn.Module]:
        return [m.conv_offset for m in self.modules() if hasattr(m, 'conv_offset')]


def build(variant: str, deform_layers: int, seed: int) -> DigitNet:
    """The ``variant`` net starting from the regular net's weights for ``seed`` (see module docstring)."""
    torch.manual_seed(seed)
    regular = DigitNet('regular')
    net = DigitNet(variant, deform_layers)
    missing, unexpected = net.load_state_dict(regular.state_dict(), strict=False)
    assert not unexpected and all('conv_offset' in k for k in missing), (missing, unexpected)
    return net


def radial_offset(offset: Tensor) -> Tensor:
    """Outward displacement of the 8 outer points of a 3x3 grid, averaged over them.

    offset (Tensor[N, 18, H, W]): channels 2k, 2k+1 hold (dy, dx) of kernel point k (row-major).
    Returns Tensor[N, H, W]: the mean over the outer points of the offset projected on the unit vector
    from the centre to the point (> 0: a wider grid, as a larger dilation would give).
    """
    ky, kx = torch.meshgrid(torch.arange(3.0) - 1, torch.arange(3.0) - 1, indexing='ij')
    position = torch.stack((ky.flatten(), kx.flatten()), -1)  # (9, 2)
    outer = position.norm(dim=1) > 0
    unit = position[outer] / position[outer].norm(dim=1, keepdim=True)
    off = offset.unflatten(1, (9, 2))[:, outer]  # (N, 8, 2, H, W)
    return (off * unit[None, :, :, None, None]).sum(2).mean(1)


def on_digit(boxes: Tensor, size: int) -> Tensor:
    """Which cells of a ``size`` x ``size`` map have their centre inside the digit's box (Tensor[N, 4],
    canvas pixels) -> Tensor[N, size, size] bool."""
    centre = (torch.arange(size) + 0.5) * CANVAS / size
    inside_x = (centre >= boxes[:, 0:1]) & (centre <= boxes[:, 2:3])
    inside_y = (centre >= boxes[:, 1:2]) & (centre <= boxes[:, 3:4])
    return inside_y[:, :, None] & inside_x[:, None, :]


def scale_bin(scale: Tensor, scale_range: Sequence[float]) -> Tensor:
    """0 / 1 / 2 for the lower / middle / upper third of ``scale_range`` in log scale."""
    lo, hi = (math.log(s) for s in scale_range)
    if hi == lo:
        return torch.ones_like(scale, dtype=torch.long)  # one scale: all 'middle'
    return ((scale.log() - lo) / (hi - lo) * 3).long().clamp(0, 2)


def by_bin(values: Tensor, bins: Tensor) -> dict:
    """Mean of ``values`` per scale third; None for a third with no digits (one-scale runs)."""
    return {b: values[bins == i].mean().item() if (bins == i).any() else None for i, b in enumerate(SCALE_BINS)}


def mean_or_none(values: list) -> Optional[float]:
    return None if None in values else statistics.mean(values)


def fmt(value: Optional[float], spec: str) -> str:
    return '-' if value is None else format(value, spec)


@torch.no_grad()
def evaluate(net: DigitNet, x: Tensor, y: Tensor, scale_range: Sequence[float], scale: Tensor,
             boxes: Tensor) -> dict:
    net.eval()
    radial = []
    hook = None
    convs = net.offset_convs()
    if convs:  # the last deformable layer; for DCNv2 the first 18 of its 27 channels are the offsets
        hook = convs[-1].register_forward_hook(lambda m, i, o: radial.append(radial_offset(o[:, :18])))
    pred = torch.cat([net(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    if hook is not None:
        hook.remove()
    bins = scale_bin(scale, scale_range)
    correct = (pred == y).float()
    result = dict(acc=correct.mean().item(),
                  acc_by_scale=by_bin(correct, bins))
    if radial:  # over the cells on the digit, then over the digits of each scale third
        r = torch.cat(radial)
        mask = on_digit(boxes, r.shape[-1])
        r = (r * mask).sum((1, 2)) / mask.sum((1, 2))
        result['radial_offset_by_scale'] = by_bin(r, bins)
    return result


def train_one(variant: str, seed: int, data: dict, args: argparse.Namespace) -> dict:
    net = build(variant, args.deform_layers, seed)
    offset_params = [p for m in net.offset_convs() for p in m.parameters()]
    offset_ids = {id(p) for p in offset_params}
    groups = [dict(params=[p for p in net.parameters() if id(p) not in offset_ids])]
    if offset_params:
        groups.append(dict(params=offset_params, lr=args.lr * args.offset_lr_mult))
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=1e-4)
    x_train, y_train = data['train']
    steps = args.epochs * math.ceil(len(y_train) / BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g['lr'] for g in opt.param_groups],
                                                total_steps=steps, pct_start=0.15)
    epoch_times = []
    for epoch in range(args.epochs):
        # the same images in the same order for every variant of one seed
        x = render_scaled(x_train, seed=seed * 100_003 + epoch, canvas=CANVAS, nominal=NOMINAL,
                          scale_range=args.train_scale_range or args.scale_range).images
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        net.train()
        start = time.perf_counter()
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            loss = F.cross_entropy(net(x[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        epoch_times.append(time.perf_counter() - start)
    result = evaluate(net, scale_range=args.scale_range, **data['test'])
    result.update(seed=seed, epoch_s=statistics.mean(epoch_times), final_loss=loss.item(),
                  params=sum(p.numel() for p in net.parameters()))
    return result


def load_data(args: argparse.Namespace) -> dict:
    images, labels = load_digit_images()
    train_idx, test_idx = split_indices(labels, test_fraction=1 / 3, seed=args.data_seed)
    test_images = images[test_idx].repeat(args.test_copies, 1, 1)
    x_test, scale, boxes = render_scaled(test_images, seed=10_000 + args.data_seed, canvas=CANVAS,
                                         nominal=NOMINAL, scale_range=args.scale_range)
    y_test = labels[test_idx].repeat(args.test_copies)
    return dict(train=(images[train_idx], labels[train_idx]),
                test=dict(x=x_test, y=y_test, scale=scale, boxes=boxes))


def summarise(runs: list[dict]) -> dict:
    accs = [100 * r['acc'] for r in runs]
    summary = dict(mean=statistics.mean(accs), std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                   epoch_s=statistics.mean(r['epoch_s'] for r in runs), params=runs[0]['params'],
                   acc_by_scale={b: mean_or_none([r['acc_by_scale'][b] for r in runs]) for b in SCALE_BINS})
    summary['acc_by_scale'] = {b: None if a is None else 100 * a for b, a in summary['acc_by_scale'].items()}
    if 'radial_offset_by_scale' in runs[0]:
        summary['radial_offset_by_scale'] = {b: mean_or_none([r['radial_offset_by_scale'][b] for r in runs])
                                             for b in SCALE_BINS}
    return summary


def table(result: dict) -> str:
    """Markdown: ours (mean +- std, per scale third, s/epoch) beside the published numbers."""
    refs = list(PUBLISHED)
    head = (['variant', 'test acc % (ours)', 'small / middle / large %', 's / epoch', 'radial offset px']
            + [f'published: {r}' for r in refs])
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for v, s in result['variants'].items():
        by_scale = ' / '.join(fmt(s['acc_by_scale'][b], '.1f') for b in SCALE_BINS)
        radial = ' / '.join(fmt(s['radial_offset_by_scale'][b], '+.2f') for b in SCALE_BINS) \
            if 'radial_offset_by_scale' in s else '-'
        pub = [f'{PUBLISHED[r][v]:.2f}' if v in PUBLISHED[r] else '-' for r in refs]
        row = [v, f"{s['mean']:.2f} ± {s['std']:.2f}", by_scale, f"{s['epoch_s']:.2f}", radial, *pub]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def plot(result: dict, path: str) -> None:
    """Our accuracy per variant (error bars: std over seeds; dots: single seeds), our error rate per scale
    third, and the published references, side by side."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, Agg via savefig

    s = result['variants']
    variants = list(s)
    colours = dict(zip(VARIANTS + CONTROLS, ('tab:gray', 'tab:blue', 'tab:orange', 'tab:green'), strict=True))
    fig = Figure(figsize=(14, 4), layout='constrained')
    ours, by_scale, published = fig.subplots(1, 3, width_ratios=(1, 1.1, 1.3))
    ours.bar(variants, [s[v]['mean'] for v in variants], yerr=[s[v]['std'] for v in variants], capsize=5,
             color=[colours[v] for v in variants])
    for i, v in enumerate(variants):
        ours.text(i, 2, f"{s[v]['mean']:.1f}\n± {s[v]['std']:.1f}", ha='center', fontsize=8, color='white')
        ours.plot([i] * len(result['runs'][v]), [100 * r['acc'] for r in result['runs'][v]], 'k.', ms=4)
    lo, hi = result['scale_range']
    ours.set_title(f"ours: digits at {lo:g}-{hi:g}x, {len(result['seeds'])} seed(s), "
                   f"{result['epochs']} epochs", fontsize=9)
    ours.set_ylabel('test accuracy (%)')
    ours.set_ylim(0, 100)

    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        points = [(i, 100 - a) for i, a in enumerate(s[v]['acc_by_scale'].values()) if a is not None]
        by_scale.bar([i + (j - (len(variants) - 1) / 2) * width for i, _ in points], [e for _, e in points],
                     width, label=v, color=colours[v])
    by_scale.set_xticks(range(len(SCALE_BINS)), [f'{b} digits' for b in SCALE_BINS], fontsize=8)
    by_scale.set_ylabel('test error (%), mean over seeds')
    by_scale.set_title('ours: error per scale third', fontsize=9)
    by_scale.legend(fontsize=8)

    width = 0.8 / len(VARIANTS)
    for j, v in enumerate(VARIANTS):
        points = [(i, ref[v]) for i, ref in enumerate(PUBLISHED.values()) if v in ref]
        bars = published.bar([i + (j - 1) * width for i, _ in points], [acc for _, acc in points], width,
                             label=v, color=colours[v])
        published.bar_label(bars, fmt='%g', fontsize=8)
    published.set_xticks(range(len(PUBLISHED)), [r.replace(' (', '\n(') for r in PUBLISHED], fontsize=8)
    published.set_ylim(0, 100)
    published.set_ylabel('test accuracy (%)')
    published.set_title('published (other protocols: see bench_digits.py)', fontsize=9)
    published.legend(fontsize=8, loc='upper right')
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=12)
    parser.add_argument('--quick', action='store_true', help='smoke run: 1 seed, 4 epochs, 1 test copy')
    parser.add_argument('--variants', nargs='+', choices=VARIANTS + CONTROLS, default=list(VARIANTS))
    parser.add_argument('--deform-layers', type=int, choices=range(len(CHANNELS) + 1), default=2,
                        help=f'how many of the {len(CHANNELS)} convs, from the top')
    parser.add_argument('--scale-range', nargs=2, type=float, default=(0.5, 2.0), metavar=('LO', 'HI'))
    parser.add_argument('--train-scale-range', nargs=2, type=float, metavar=('LO', 'HI'),
                        help='train at other scales than the test set (default: --scale-range)')
    parser.add_argument('--lr', type=float, default=3e-3)
    parser.add_argument('--offset-lr-mult', type=float, default=0.1)
    parser.add_argument('--test-copies', type=int, default=3, help='renders of each test digit')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads (1: the numbers do not depend on other jobs fighting for cores)')
    parser.add_argument('--data-seed', type=int, default=0, help='train/test split and test rendering')
    parser.add_argument('--out', default=osp.join(REPO, 'work_dirs', 'bench', 'digits.json'))
    parser.add_argument('--plot', default=osp.join(REPO, 'work_dirs', 'bench', 'digits.png'))
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.test_copies = args.seeds[:1], 4, 1
    torch.set_num_threads(args.threads)
    data = load_data(args)
    print(f'{len(data["train"][1])} train digits (re-drawn each epoch), '
          f'{len(data["test"]["y"])} test images, '
          f'scales {args.scale_range[0]:g}-{args.scale_range[1]:g}x of {NOMINAL:g} px on {CANVAS}x{CANVAS}; '
          f'torch threads {torch.get_num_threads()}', flush=True)
    runs: dict[str, list] = {v: [] for v in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            r = train_one(variant, seed, data, args)
            runs[variant].append(r)
            print(f"{variant:8s} seed {seed}: test acc {100 * r['acc']:.2f}%  "
                  f"({r['epoch_s']:.2f} s/epoch, final train loss {r['final_loss']:.3f})", flush=True)
    result = dict(seeds=args.seeds, epochs=args.epochs, deform_layers=args.deform_layers,
                  scale_range=list(args.scale_range),
                  train_scale_range=list(args.train_scale_range or args.scale_range), lr=args.lr,
                  offset_lr_mult=args.offset_lr_mult, test_images=len(data['test']['y']),
                  threads=torch.get_num_threads(), published=PUBLISHED,
                  variants={v: summarise(r) for v, r in runs.items()}, runs=runs)
    print('\n' + table(result))
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    if args.plot:
        plot(result, args.plot)
    print(f'\nwritten to {args.out}' + (f' and {args.plot}' if args.plot else ''))
    return result


if __name__ == '__main__':
    main()
