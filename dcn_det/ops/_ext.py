"""Load dcn_det's compiled CPU kernel, ``dcn_det._C`` (built from ``csrc/`` by the package build).

The package build compiles it as mmcv and detectron2 compile theirs (``setup.py``,
``torch.utils.cpp_extension``): ``pip install --no-build-isolation .``, or ``-e .`` in a checkout, where
``make setup`` does it. Importing dcn_det never compiles anything: :func:`load` returns the module, or
None when it is missing (a pure-Python build, ``DCN_DET_WITH_OPS=0``) or does not load (built against
another torch), and the ops then run their public-API path; :func:`missing_reason` says why.
"""
import importlib
import os.path as osp
from types import ModuleType
from typing import Optional

MODULE = 'dcn_det._C'
# The kernel's sources and compile flags: setup.py builds with these, and so does a benchmark that
# builds a variant of the kernel.
SOURCES = [osp.join(osp.dirname(osp.abspath(__file__)), 'csrc', 'deform_conv_cpu.cpp')]
CFLAGS = ['-O3', '-fopenmp']
HOW_TO_BUILD = 'pip install --no-build-isolation . (in a checkout: make setup)'

_state: dict = {}


def load() -> Optional[ModuleType]:
    """The compiled kernel module, or None (see :func:`missing_reason`). Imported once."""
    if 'module' not in _state:
        try:
            _state['module'] = importlib.import_module(MODULE)
        except ImportError as e:  # not built, or built against another torch (undefined symbols)
            _state['module'], _state['reason'] = None, f'{type(e).__name__}: {e}'
    return _state['module']


def missing_reason() -> Optional[str]:
    """Why :func:`load` returns None, or None when the kernel is loaded."""
    load()
    return _state.get('reason')
