"""Convert torchvision's ImageNet ResNet weights into the file the configs' ``pretrained`` names.

Usage (once, on a machine that can download; nothing in dcn_det downloads at run time)::

    curl -LO https://download.pytorch.org/models/resnet50-0676ba61.pth
    python tools/convert_torchvision_resnet.py resnet50-0676ba61.pth data/pretrained/resnet50_torchvision.pth

torchvision's ResNet keys are mmdet's ResNet keys, so the conversion keeps the backbone's tensors
(``conv1``, ``bn1``, ``layer*``), drops the classifier (``fc.*``), and saves ``{'meta', 'state_dict'}``
on CPU; every key not converted is printed. The configs consume it with
``model.backbone.init_cfg = dict(type='Pretrained', checkpoint='data/pretrained/resnet50_torchvision.pth')``
(already the default in ``configs/_base_/faster_rcnn_r50_fpn_coco.py``); the deformable layers'
offset predictors are not in it and start from zero.

A ResNet saved inside a wrapper (``module.`` from DistributedDataParallel, or e.g. ``module.pre.``
from a self-supervised run) is found under its prefix, which is stripped and named; keys outside it
are not converted. ``--prefix`` picks one when a file holds several ResNets (a momentum encoder next
to the online one)::

    python tools/convert_torchvision_resnet.py moco.pth out.pth --prefix module.encoder_q.
"""
import argparse
import os
import os.path as osp
import re
from typing import Any, Dict, List, Optional, Tuple

from dcn_det.checkpoint import CheckpointLoadError, atomic_save, load_checkpoint_file
from dcn_det.cli import UsageError, fail

# Every torchvision (and mmdet) ResNet has these two keys; their common prefix is the wrapper's.
_STEM, _FIRST_BLOCK = 'conv1.weight', 'layer1.0.conv1.weight'
# The backbone's keys (the classifier fc.* and whatever else a wrapper holds are not converted)
_RESNET_KEY = re.compile(r'(conv1|bn1|layer\d+)\.')


def resnet_prefixes(state: Dict[str, Any]) -> List[str]:
    """The prefixes under which ``state`` holds a ResNet: ``''`` for a bare one, ``'module.'`` for a
    DDP-wrapped one, and so on."""
    prefixes = (k[:-len(_STEM)] for k in state if k.endswith(_STEM))
    return sorted(p for p in prefixes if (p == '' or p.endswith('.')) and p + _FIRST_BLOCK in state)


def convert(src: str, dst: str, prefix: Optional[str] = None) -> Tuple[str, List[str]]:
    """Write the ResNet in ``src`` (torchvision layout, under ``prefix`` or the one prefix found) to
    ``dst`` in mmdet layout; return the prefix stripped and the keys not converted."""
    if osp.exists(dst):
        raise UsageError(f'{dst!r} exists: remove it or choose another output path')
    ckpt = load_checkpoint_file(src)
    state = ckpt.get('state_dict', ckpt)
    found = resnet_prefixes(state)
    if not found:
        raise UsageError(f'{src!r} is not a torchvision ResNet state dict (no conv1/layer1 keys under any prefix)')
    if prefix is None:
        if len(found) > 1:
            raise UsageError(f'{src!r} holds a ResNet under each of the prefixes {", ".join(map(repr, found))}: '
                             'choose one with --prefix')
        prefix = found[0]
    elif prefix not in found:
        raise UsageError(f'{src!r} holds no ResNet under --prefix {prefix!r}; it holds one under '
                         f'{", ".join(map(repr, found))}')
    kept, skipped = {}, []
    for key, value in state.items():
        name = key[len(prefix):]
        if key.startswith(prefix) and _RESNET_KEY.match(name):
            kept[name] = value.cpu()
        else:
            skipped.append(key)
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    meta = {'source': osp.abspath(src), 'layout': 'mmdet', 'stripped_prefix': prefix}
    atomic_save({'meta': meta, 'state_dict': kept}, dst)
    return prefix, skipped


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Convert torchvision ResNet weights for dcn_det configs')
    parser.add_argument('src')
    parser.add_argument('dst')
    parser.add_argument('--prefix', help="the ResNet's key prefix in SRC, e.g. 'module.' (default: the one found)")
    args = parser.parse_args(argv)
    try:
        prefix, skipped = convert(args.src, args.dst, args.prefix)
    except (UsageError, CheckpointLoadError) as e:
        fail(str(e))
    if prefix:
        print(f'stripped the prefix {prefix!r} from the ResNet keys')
    for key in skipped:
        print(f'not converted: {key}')
    print(f'wrote {args.dst}')

if __name__ == '__main__':
    main()
