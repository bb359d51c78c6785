"""Build and load dcn_det's compiled CPU kernels (``csrc/deform_conv_cpu.cpp``).

The extension is compiled once by the set-up (``python dcn_det/ops/kernels/extension.py``, which
``scripts/setup_env.sh`` runs) into a cache outside the repository, keyed by the source, torch and
Python, so that a fresh clone on the same machine reuses it, as the mmcv wheel is reused. Importing
dcn_det never compiles anything: :func:`load` returns the built module, or None when there is none
(no compiler, a failed build, another torch), and the ops then run their public-API path.

    python dcn_det/ops/kernels/extension.py            # build (if needed) and report
    DCN_DET_CACHE=/path ...                             # cache root (default ~/.cache/dcn_det)
"""
import hashlib
import importlib.util
import os
import os.path as osp
import shutil
import sys
import sysconfig
from types import ModuleType
from typing import Optional

import torch

SOURCE = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc', 'deform_conv_cpu.cpp')
CFLAGS = ['-O3', '-fopenmp']


def cache_root() -> str:
    return os.environ.get('DCN_DET_CACHE') or osp.join(osp.expanduser('~'), '.cache', 'dcn_det')


def _key() -> str:
    with open(SOURCE, 'rb') as f:
        text = f.read()
    tag = f'{torch.__version__}|{sys.implementation.cache_tag}|{sysconfig.get_platform()}|{CFLAGS}'.encode()
    return hashlib.sha256(text + tag).hexdigest()[:16]


def _paths() -> tuple[str, str, str]:
    """(module name, its build directory, the shared library's path)."""
    key = _key()
    name = f'dcn_det_cpu_{key}'
    directory = osp.join(cache_root(), f'ext-{name}')
    return name, directory, osp.join(directory, f'{name}.so')  # cpp_extension's naming


_loaded: dict[str, ModuleType] = {}


def load() -> Optional[ModuleType]:
    """The compiled module if it has been built for this source, torch and Python; else None."""
    name, _, library = _paths()
    if name in _loaded:
        return _loaded[name]
    if not osp.isfile(library):
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError):
        return None
    _loaded[name] = module
    return module


def build(verbose: bool = False) -> ModuleType:
    """Compile the extension into the cache (if it is not there yet) and return it.

    Raises whatever torch's compiler driver raises (no compiler, a compile error).
    """
    from torch.utils.cpp_extension import load as load_extension

    module = load()
    if module is not None:
        return module
    name, directory, _ = _paths()
    tmp = f'{directory}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        module = load_extension(name=name, sources=[SOURCE], extra_cflags=CFLAGS, extra_ldflags=['-fopenmp'],
                                build_directory=tmp, verbose=verbose)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)  # atomic: a killed build leaves no half-built cache entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _loaded[name] = module
    return module


def main() -> int:
    try:
        build(verbose='-v' in sys.argv)
    except Exception as e:  # a machine without a compiler still works, on the public-API path
        print(f'[dcn_det] could not build the compiled CPU kernels ({type(e).__name__}: '
              f'{str(e).strip().splitlines()[-1] if str(e).strip() else ""}); the ops will use their '
              f'slower public-API path', file=sys.stderr)
        return 1
    name, directory, _ = _paths()
    print(f'[dcn_det] compiled CPU kernels: {directory}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
