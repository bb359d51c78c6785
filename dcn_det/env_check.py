"""The installed stack: check it before anything imports ``mmcv.ops``, report it, read the lock.

``import dcn_det`` calls :func:`check_stack`: an mmcv that mmdet 3.x refuses, or one built without its
compiled ops (``mmcv-lite``, ``MMCV_WITH_OPS=0``, another torch), stops the import with one line naming
the installed and the accepted version and the fix, instead of a deep ``mmcv._ext`` traceback from inside
mmdet; a torch, torchvision, mmengine or mmdet outside the ranges dcn_det was tested with (its package
metadata, from ``pyproject.toml``) is named in one warning.

    python -m dcn_det.env_check [--json]     # the versions in use, mmcv's ops, dcn_det's CPU kernel, CUDA, CPU

In a checkout, ``scripts/setup_env.sh`` reads the exact versions it installs from ``constraints.txt``
through this file (``python dcn_det/env_check.py --pin NAME``), with the standard library alone.
"""
import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os.path as osp
import platform
import re
import sys
import warnings
from typing import Dict, List, Optional

_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
_PYPROJECT = osp.join(_ROOT, 'pyproject.toml')
_CONSTRAINTS = osp.join(_ROOT, 'constraints.txt')
_PIN = re.compile(r'\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)')
_REQUIREMENT = re.compile(r'\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)')
# mmdet 3.x's own bounds (mmdet/__init__.py: mmcv_minimum_version, mmcv_maximum_version)
MMCV_ACCEPTED = '>=2.0.0rc4,<2.2.0'
BUILD_MMCV = ('build mmcv with its ops against this torch: `make setup` in a dcn_det checkout, or mmcv\'s '
              'source build (README, Installation)')


class StackError(ImportError):
    """A package dcn_det needs is missing, of a version that cannot work, or lacks its compiled ops."""


MMCVInstallError = StackError  # the name before torch, mmdet and mmengine were checked too


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
    """``{name: version}``: what ``make setup`` and CI install exactly (``constraints.txt`` in a checkout)."""
    if not osp.isfile(_CONSTRAINTS):
        raise FileNotFoundError(f'{_CONSTRAINTS} not found: the exact versions are read from a dcn_det checkout')
    with open(_CONSTRAINTS) as f:
        return {_normalise(m[1]): m[2] for m in map(_PIN.match, f) if m}


def requirements() -> Dict[str, str]:
    """``{name: specifier}``: the ranges dcn_det works with (pyproject.toml, or the installed metadata)."""
    data = _pyproject()
    if data is not None:
        lines = data['project']['dependencies']
    else:
        lines = [r for r in importlib.metadata.requires('dcn_det') or [] if 'extra ==' not in r]
    return {_normalise(m[1]): m[2].strip() for m in map(_REQUIREMENT.match, lines) if m}


def mmcv_sdist_sha256() -> str:
    """The sha256 of the mmcv sdist that scripts/setup_env.sh builds (``[tool.dcn_det]`` in pyproject.toml)."""
    data = _pyproject()
    if data is None:
        raise FileNotFoundError(f'{_PYPROJECT} not found: the mmcv sdist checksum is read from the source tree')
    return data['tool']['dcn_det']['mmcv-sdist-sha256']


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _within(version: str, specifier: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return SpecifierSet(specifier).contains(Version(version), prereleases=True)


def check_mmcv() -> None:
    """Raise :class:`StackError` naming the fix unless an mmcv that mmdet 3.x accepts, with its compiled
    ops, is importable."""
    if not _installed('mmcv'):
        raise StackError(f'mmcv is not installed: dcn_det needs mmcv{MMCV_ACCEPTED} with ops; {BUILD_MMCV}.')
    import mmcv

    if not _within(mmcv.__version__, MMCV_ACCEPTED):
        raise StackError(f'mmcv {mmcv.__version__} is installed but mmdet 3.x accepts mmcv{MMCV_ACCEPTED}: '
                         f'{BUILD_MMCV}.')
    try:
        importlib.import_module('mmcv._ext')
    except ImportError as e:
        raise StackError(
            f'mmcv {mmcv.__version__} is installed without its compiled ops (mmcv._ext: {e}). It was built '
            f'with MMCV_WITH_OPS=0, is mmcv-lite, or was built against another torch: {BUILD_MMCV}.') from None


def untested() -> List[str]:
    """One line for each installed package outside the range dcn_det was tested with."""
    found = []
    for name, specifier in requirements().items():
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if _installed(name):
                continue  # importable but not pip-installed (a source checkout on the path): no version to check
            found.append(f'{name} is not installed (dcn_det needs {name}{specifier}): pip install "{name}{specifier}"')
            continue
        if specifier and not _within(version, specifier):
            found.append(f'{name} {version} is installed; dcn_det is tested with {name}{specifier}')
    if _installed('mmengine') and not _installed('pkg_resources'):
        found.append('pkg_resources is missing (setuptools >= 81 dropped it), which mmengine 0.10 needs to read '
                     '`mmdet::` configs: pip install "setuptools<81"')
    return found


def check_stack() -> None:
    """What ``import dcn_det`` checks: mmcv strictly (:func:`check_mmcv`), the other packages against the
    tested ranges (one warning naming each one outside them)."""
    check_mmcv()
    outside = untested()
    if outside:
        warnings.warn('dcn_det: ' + '; '.join(outside), stacklevel=3)


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
                        platform.processor())
    except OSError:
        return platform.processor()


def collect_env() -> dict:
    """The environment as one flat dict (``python -m dcn_det.env_check --json`` prints it), like mmengine's
    ``collect_env``: versions, whether mmcv's and dcn_det's compiled kernels load, CUDA, the CPU; ``problem``:
    what stops ``import dcn_det`` (or None); ``untested``: packages outside the tested ranges."""
    env: dict = {'python': platform.python_version(), 'platform': platform.platform()}
    try:
        env['dcn_det'] = importlib.metadata.version('dcn_det')
    except importlib.metadata.PackageNotFoundError:
        env['dcn_det'] = None
    import torch

    env.update(torch=torch.__version__, cuda=torch.cuda.is_available(), cuda_version=torch.version.cuda,
               gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               cpu=_cpu_name(), cpu_capability=torch.backends.cpu.get_cpu_capability())
    for name in ('torchvision', 'mmengine', 'mmdet'):  # from the metadata: importing mmdet checks mmcv itself
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    env['mmcv'] = importlib.import_module('mmcv').__version__ if _installed('mmcv') else None
    try:
        importlib.import_module('mmcv._ext')
        env['mmcv_ops'] = True
    except ImportError:
        env['mmcv_ops'] = False
    from dcn_det.ops import _ext

    env['cpu_kernel'] = _ext.load() is not None
    env['cpu_kernel_missing'] = _ext.missing_reason()
    try:
        check_mmcv()
        env['problem'] = None
    except StackError as e:
        env['problem'] = str(e)
    env['untested'] = untested()
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Report dcn_det's environment; check it; print a locked version.")
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    parser.add_argument('--quiet', action='store_true', help='check only: exit 1 naming the problem, else nothing')
    parser.add_argument('--pin', metavar='NAME', help="print NAME's exact version in constraints.txt and exit")
    parser.add_argument('--mmcv-sdist-sha256', action='store_true', help="print the mmcv sdist's sha256 and exit")
    args = parser.parse_args(argv)
    if args.pin:
        locked = pins()
        if _normalise(args.pin) not in locked:
            print(f'dcn_det: no exact version for {args.pin!r} in constraints.txt (it has: {", ".join(locked)})',
                  file=sys.stderr)
            return 1
        print(locked[_normalise(args.pin)])
        return 0
    if args.mmcv_sdist_sha256:
        print(mmcv_sdist_sha256())
        return 0
    if args.quiet:
        try:
            check_mmcv()
        except StackError as e:
            print(f'dcn_det: {e}', file=sys.stderr)
            return 1
        return 0
    env = collect_env()
    if args.json:
        print(json.dumps(env))
    else:
        width = max(map(len, env))
        for key, value in env.items():
            print(f'{key:<{width}} {"; ".join(value) if isinstance(value, list) else value}')
    return 1 if env['problem'] else 0


if __name__ == '__main__':
    sys.exit(main())
