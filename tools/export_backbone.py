"""Export the backbone of a detector checkpoint as a standalone pretrained-weights file.

Usage::

    python tools/export_backbone.py work_dirs/faster_rcnn_dcnv2/epoch_12.pth backbone_dcnv2.pth
    python tools/export_backbone.py CKPT resnet_tv.pth --layout torchvision   # plain ResNet keys

The output holds ``meta`` (source checkpoint and config, the DCN layout) and ``state_dict`` with
the ``backbone.`` prefix removed, saved on CPU and weights-only loadable. Consume it with::

    model = dict(backbone=dict(type='DCNResNet', init_cfg=dict(type='Pretrained', checkpoint='backbone_dcnv2.pth')))
    # or mmdet's own: dict(type='ResNet', dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
    #                      stage_with_dcn=(False, True, True, True), init_cfg=dict(type='Pretrained', checkpoint=...))

``--layout torchvision`` writes torchvision's ResNet keys for the non-deformable part (the offset
predictors have no place there and are reported as unmapped): ``torchvision.models.resnet50()``
loads it with ``strict=False``, missing only ``fc``. Every key dropped or not mapped is printed.
"""
import argparse
import os.path as osp
import re
from typing import Dict, List, Tuple

from dcn_det.checkpoint import CheckpointLoadError, atomic_save, load_checkpoint_file
from dcn_det.cli import UsageError, fail

PREFIX = 'backbone.'


def dcn_layout(state: Dict) -> Dict:
    """Infer the DCN layout from the keys: deformable layers, their kind and deform groups."""
    layers = sorted(k[:-len('.conv_offset.weight')] for k in state if k.endswith('.conv_offset.weight'))
    stages = sorted({int(re.match(r'layer(\d+)', k)[1]) for k in layers})
    layout = {'deformable_layers': layers, 'stages_with_dcn': stages}
    if layers:
        out_ch, _, kh, kw = state[layers[0] + '.conv_offset.weight'].shape
        # DCNv2 predicts 3 channels per kernel point and group (dy, dx, mask), DCNv1 two.
        per_group = 3 * kh * kw if out_ch % (3 * kh * kw) == 0 else 2 * kh * kw
        layout.update(type='MDConv' if per_group == 3 * kh * kw else 'DConv', deform_groups=out_ch // per_group)
    return layout


def convert(src: str, dst: str, layout: str = 'mmdet', trust: bool = False) -> Tuple[Dict, List[str]]:
    """Write the backbone of ``src`` to ``dst``; return (meta, keys dropped or not mapped)."""
    if osp.exists(dst):
        raise UsageError(f'{dst!r} exists: remove it or choose another output path')
    ckpt = load_checkpoint_file(src, trust=trust)
    state = ckpt.get('state_dict', ckpt)
    backbone = {k[len(PREFIX):]: v.cpu() for k, v in state.items() if k.startswith(PREFIX)}
    if not backbone:
        raise UsageError(f'{src!r} has no {PREFIX!r} keys: it is not a detector checkpoint')
    dropped = [k for k in state if not k.startswith(PREFIX)]
    dcn = dcn_layout(backbone)
    if layout == 'torchvision':
        dropped += [PREFIX + k for k in backbone if '.conv_offset.' in k]
        backbone = {k: v for k, v in backbone.items() if '.conv_offset.' not in k}
    meta = dict(source=osp.abspath(src), config=ckpt.get('meta', {}).get('cfg', ''), layout=layout, dcn=dcn)
    atomic_save({'meta': meta, 'state_dict': backbone}, dst)
    return meta, dropped


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('checkpoint', help='detector checkpoint (tools/train.py output)')
    parser.add_argument('out', help='output file (must not exist)')
    parser.add_argument('--layout', choices=['mmdet', 'torchvision'], default='mmdet')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='allow a checkpoint that pickles Python objects (can run code)')
    args = parser.parse_args(argv)
    try:
        meta, dropped = convert(args.checkpoint, args.out, args.layout, args.trust_checkpoint)
    except (UsageError, CheckpointLoadError) as e:
        fail(str(e))
    for key in dropped:
        print(f'not exported: {key}')
    dcn = meta['dcn']
    print(f'wrote {args.out} ({args.layout} layout): {len(dcn["deformable_layers"])} deformable layers '
          f'{dcn.get("type", "")} in stages {dcn["stages_with_dcn"]}, {len(dropped)} keys not exported')


if __name__ == '__main__':
    main()
