"""The configs that ship inside the package, for use outside a checkout (as detectron2's ``model_zoo``).

mmengine resolves ``_base_ = 'pkg::path'`` only for the OpenMMLab packages it knows, so a config of your
own reaches dcn_det's in one of two ways:

- over mmdet's own bases, with dcn_det's layers (see the README)::

      _base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
      custom_imports = dict(imports=['dcn_det'], allow_failed_imports=False)
      model = dict(backbone=dict(type='DCNResNet', ...), ...)

- from a shipped config, written out whole (its ``_base_`` chain merged) next to yours, then inherited
  with a relative path, the way ``mim download`` hands out mmdet's configs::

      python -m dcn_det.model_zoo                                   # list the shipped configs
      python -m dcn_det.model_zoo faster_rcnn_dcnv2                 # print its path
      python -m dcn_det.model_zoo faster_rcnn_dcnv2 --dump my_configs/faster_rcnn_dcnv2.py
      # my_configs/my_experiment.py:  _base_ = './faster_rcnn_dcnv2.py'

In a checkout, ``configs/`` is this same folder.
"""
import argparse
import os
import os.path as osp
import sys
from typing import List

CONFIG_DIR = osp.join(osp.dirname(osp.abspath(__file__)), 'configs')


def list_configs() -> List[str]:
    """The names of the shipped configs (``_base_`` files left out)."""
    return sorted(osp.splitext(f)[0] for f in os.listdir(CONFIG_DIR) if f.endswith('.py'))


def get_config_file(name: str) -> str:
    """The path of the shipped config ``name`` (``'faster_rcnn_dcnv2'`` or ``'faster_rcnn_dcnv2.py'``)."""
    stem = osp.splitext(osp.basename(name))[0]
    if stem not in list_configs():
        raise FileNotFoundError(f'dcn_det ships no config {name!r}; it ships: {", ".join(list_configs())}')
    return osp.join(CONFIG_DIR, f'{stem}.py')


def get_config(name: str):
    """The shipped config ``name`` as an :class:`mmengine.config.Config`."""
    from mmengine.config import Config

    return Config.fromfile(get_config_file(name))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description='List, locate or write out the configs shipped with dcn_det.')
    parser.add_argument('name', nargs='?', help='a shipped config; none: list them')
    parser.add_argument('--dump', metavar='OUT.py', help='write the config, its _base_ chain merged, to OUT.py')
    args = parser.parse_args(argv)
    if args.name is None:
        for name in list_configs():
            print(f'{name:<28} {get_config_file(name)}')
        return 0
    try:
        path = get_config_file(args.name)
    except FileNotFoundError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.dump is None:
        print(path)
        return 0
    if osp.exists(args.dump):
        print(f'error: {args.dump} exists; choose another path (nothing was written)', file=sys.stderr)
        return 2
    if not args.dump.endswith('.py'):
        print(f'error: {args.dump} must end in .py (an mmengine config)', file=sys.stderr)
        return 2
    os.makedirs(osp.dirname(osp.abspath(args.dump)), exist_ok=True)
    get_config(args.name).dump(args.dump)
    print(f'wrote {args.dump} (from {path})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
