"""Convert torchvision's ImageNet ResNet weights into the file the configs' ``pretrained`` names.

Usage (once, on a machine that can download; nothing in dcn_det downloads at run time)::

    curl -LO https://download.pytorch.org/models/resnet50-0676ba61.pth
    python tools/convert_torchvision_resnet.py resnet50-0676ba61.pth data/pretrained/resnet50_torchvision.pth

torchvision's ResNet keys are mmdet's ResNet keys, so the conversion drops the classifier (``fc.*``),
keeps every other tensor, and saves ``{'meta', 'state_dict'}`` on CPU; every key not converted is
printed. The configs consume it with
``model.backbone.init_cfg = dict(type='Pretrained', checkpoint='data/pretrained/resnet50_torchvision.pth')``
(already the default in ``configs/_base_/faster_rcnn_r50_fpn_coco.py``); the deformable layers'
offset predictors are not in it and start from zero.
"""
import argparse
import os
import os.path as osp
import sys
from typing import List

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from dcn_det.checkpoint import CheckpointLoadError, atomic_save, load_checkpoint_file  # noqa: E402
from dcn_det.cli import UsageError, fail  # noqa: E402


def convert(src: str, dst: str) -> List[str]:
    """Write ``src`` (torchvision ResNet) to ``dst`` in mmdet layout; return the keys not converted."""
    if osp.exists(dst):
        raise UsageError(f'{dst!r} exists: remove it or choose another output path')
    ckpt = load_checkpoint_file(src)
    state = ckpt.get('state_dict', ckpt)
    if 'conv1.weight' not in state or 'layer1.0.conv1.weight' not in state:
        raise UsageError(f'{src!r} is not a torchvision ResNet state dict (no conv1/layer1 keys)')
    kept = {k: v.cpu() for k, v in state.items() if not k.startswith('fc.')}
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    atomic_save({'meta': {'source': osp.abspath(src), 'layout': 'mmdet'}, 'state_dict': kept}, dst)
    return [k for k in state if k.startswith('fc.')]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Convert torchvision ResNet weights for dcn_det configs')
    parser.add_argument('src')
    parser.add_argument('dst')
    args = parser.parse_args(argv)
    try:
        skipped = convert(args.src, args.dst)
    except (UsageError, CheckpointLoadError) as e:
        fail(str(e))
    for key in skipped:
        print(f'not converted: {key}')
    print(f'wrote {args.dst}')


if __name__ == '__main__':
    main()
