"""Deprecated: :mod:`dcn_det.deploy.backends` (the ONNX and PyTorch detectors) and
:func:`dcn_det.checkpoint.load_detector`; "runner" is mmengine's Runner (:mod:`dcn_det.engine`)."""
import warnings

_MOVED = {'ModelMismatchError': 'dcn_det.deploy.backends', 'OnnxDetector': 'dcn_det.deploy.backends',
          'TorchDetector': 'dcn_det.deploy.backends', 'onnx_eval_model': 'dcn_det.deploy.backends',
          'load_detector': 'dcn_det.checkpoint'}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    warnings.warn(f'dcn_det.deploy.runners is deprecated: import {name} from {_MOVED[name]}', DeprecationWarning,
                  stacklevel=2)
    import importlib

    return getattr(importlib.import_module(_MOVED[name]), name)
