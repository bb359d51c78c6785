"""Check the mmcv install before anything imports ``mmcv.ops``; read the version pins.

Without the check, an mmcv built without its compiled ops (``mmcv-lite``, or a wheel built with
``MMCV_WITH_OPS=0``) surfaces as a deep ``ModuleNotFoundError: mmcv._ext`` traceback from inside
mmdet. ``python dcn_det/env_check.py`` prints what is installed.

The versions are pinned in one place, ``pyproject.toml``; :func:`pins` reads them from there (or,
for an installed dcn_det without its source tree, from the package metadata), and
``scripts/setup_env.sh`` asks this file for them (``--pin NAME``, ``--mmcv-sdist-sha256``). It runs
with the standard library alone, before anything else is installed.
"""
import argparse
import importlib
import importlib.metadata
import importlib.util
import os.path as osp
import re
import sys
from typing import Dict, Optional

_PYPROJECT = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'pyproject.toml')
_PIN = re.compile(r'\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)')


class MMCVInstallError(ImportError):
    """mmcv is missing, the wrong version, or lacks its compiled ops."""


def _normalise(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


def _pyproject() -> Optional[dict]:
    """The source tree's pyproject.toml, if this file sits in one (not in an installed copy)."""
    if not osp.isfile(_PYPROJECT):
        return None
    import tomllib

    with open(_PYPROJECT, 'rb') as f:
        data = tomllib.load(f)
    return data if data.get('project', {}).get('name') == 'dcn_det' else None


def pins() -> Dict[str, str]:
    """``{name: version}`` for every exact pin (``name==version``) of dcn_det, optional ones included.

    From pyproject.toml, the one place the pins are stated; for an installed dcn_det without its
    source tree, from the installed package's metadata (written from that same file).
    """
    data = _pyproject()
    if data is not None:
        project = data['project']
        requirements = list(project.get('dependencies', []))
        for extra in project.get('optional-dependencies', {}).values():
            requirements += extra
    else:
        requirements = importlib.metadata.requires('dcn_det') or []
    return {_normalise(m[1]): m[2] for m in map(_PIN.match, requirements) if m}


def mmcv_sdist_sha256() -> str:
    """The sha256 of the mmcv sdist that scripts/setup_env.sh builds (``[tool.dcn_det]`` in pyproject.toml)."""
    data = _pyproject()
    if data is None:
        raise FileNotFoundError(f'{_PYPROJECT} not found: the mmcv sdist checksum is read from the source tree')
    return data['tool']['dcn_det']['mmcv-sdist-sha256']


def _fix(mmcv: str) -> str:
    return f'run `make setup` (scripts/setup_env.sh), which builds mmcv {mmcv} with ops against this torch'


def check_mmcv() -> None:
    """Raise :class:`MMCVInstallError` naming the fix unless the pinned mmcv with compiled ops is importable."""
    pinned = pins()
    wanted = pinned['mmcv']
    if importlib.util.find_spec('mmcv') is None:
        raise MMCVInstallError(f'mmcv is not installed: {_fix(wanted)}.')
    import mmcv

    if mmcv.__version__ != wanted:
        raise MMCVInstallError(
            f'mmcv {mmcv.__version__} is installed but dcn_det needs mmcv=={wanted} '
            f'(mmdet {pinned["mmdet"]} refuses mmcv >= 2.2): {_fix(wanted)}.')
    try:
        importlib.import_module('mmcv._ext')
    except ImportError as e:
        raise MMCVInstallError(
            f'mmcv {mmcv.__version__} is installed without its compiled ops (mmcv._ext: {e}). '
            f'It was built with MMCV_WITH_OPS=0 or is mmcv-lite, or was built against another torch: '
            f'{_fix(wanted)}.') from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description='Check the mmcv install; print the versions in use or a pin.')
    parser.add_argument('--quiet', action='store_true', help='check only, print nothing on success')
    parser.add_argument('--pin', metavar='NAME', help="print NAME's pinned version (pyproject.toml) and exit")
    parser.add_argument('--mmcv-sdist-sha256', action='store_true', help="print the mmcv sdist's sha256 and exit")
    args = parser.parse_args(argv)
    if args.pin:
        pinned = pins()
        if _normalise(args.pin) not in pinned:
            print(f'dcn_det: no exact pin for {args.pin!r} in pyproject.toml (pinned: {", ".join(pinned)})',
                  file=sys.stderr)
            return 1
        print(pinned[_normalise(args.pin)])
        return 0
    if args.mmcv_sdist_sha256:
        print(mmcv_sdist_sha256())
        return 0
    try:
        check_mmcv()
    except MMCVInstallError as e:
        print(f'dcn_det: {e}', file=sys.stderr)
        return 1
    if not args.quiet:
        import mmcv
        import mmdet
        import mmengine
        import torch
        import torchvision
        from mmcv.ops import get_compiling_cuda_version
        print(f'torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), '
              f'torchvision {torchvision.__version__}, mmengine {mmengine.__version__}, '
              f'mmcv {mmcv.__version__} with ops (compiled cuda: {get_compiling_cuda_version()}), '
              f'mmdet {mmdet.__version__}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
