"""Checkpoints that load with ``torch.load(weights_only=True)``, and the one place that may load others.

torch >= 2.6 loads with ``weights_only=True``; mmengine's Runner pickles its ``MessageHub`` (numpy
arrays inside ``HistoryBuffer``) into every checkpoint, so out of the box ``--resume``, ``load_from``
and ``tools/test.py CKPT`` fail, and the only way to load such a file is to unpickle arbitrary code.
Our trust model: checkpoints written by dcn_det hold tensors, numbers, strings and containers only
(:func:`to_weights_only`) and load safely; a foreign checkpoint that needs full unpickling is loaded
only when the user names that file with ``--trust-checkpoint`` (:func:`load_checkpoint_file`).
:func:`load_detector` is what the tools, the deployment code and the benchmarks build a trained
detector with: the config's model, the checkpoint loaded strictly.
"""
import copy
import os
import os.path as osp
import pickle
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Optional

import numpy as np
import torch

_BUFFER_TAG = '__history_buffer__'


class CheckpointLoadError(RuntimeError):
    """A checkpoint that is missing, or cannot be loaded safely."""


def load_checkpoint_file(path: str, *, trust: bool = False, map_location: Any = 'cpu') -> dict:
    """Load a checkpoint with ``weights_only=True``, or fully unpickled if ``trust`` is set.

    Raises:
        CheckpointLoadError: the file is missing, or needs unpickling and ``trust`` is False; the
            message says how to proceed.
    """
    if not osp.isfile(path):
        raise CheckpointLoadError(f'checkpoint {path!r} does not exist')
    with open(path, 'rb') as f:
        magic = f.read(2)
    # torch.save writes a zip archive (legacy files: a pickle, which starts with the PROTO opcode)
    if not (zipfile.is_zipfile(path) or magic[:1] == b'\x80'):
        raise CheckpointLoadError(f'{path!r} is not a PyTorch checkpoint (neither a torch.save archive nor a pickle)')
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointLoadError(
            f'{path!r} holds pickled Python objects, so it cannot be loaded with weights_only=True '
            f'({first[:200]}). Checkpoints written by dcn_det never do; if you trust this file, pass '
            '--trust-checkpoint to load it with full unpickling (it can run code).') from None
    except (RuntimeError, EOFError, IndexError, ValueError) as e:
        raise CheckpointLoadError(f'{path!r} is not a PyTorch checkpoint ({type(e).__name__}: {e})') from None


def state_dict_differences(own: dict, state_dict: dict) -> dict:
    """``{'missing keys': [...], 'unexpected keys': [...], 'shape mismatches': [...]}`` of
    ``state_dict`` against a model's own state dict ``own``, each list sorted."""
    return {
        'missing keys': sorted(set(own) - set(state_dict)),
        'unexpected keys': sorted(set(state_dict) - set(own)),
        'shape mismatches': sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape),
    }


def describe_differences(differences: dict) -> str:
    """One line naming how many keys differ and the first few of each kind."""
    return '; '.join(f"{len(keys)} {name} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                     for name, keys in differences.items() if keys)


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, a mismatch told in one line.

    Keys are compared as the modules read them: a versioned module's ``_load_from_state_dict`` first
    converts an older layout (mmcv's DCN, :class:`~dcn_det.models.DeformRoIExtractor`). Shapes of
    the keys both sides share are checked before anything is copied; a missing or unexpected key is
    found while loading, so a refused model may be partly loaded (the tools then stop).

    Raises:
        CheckpointLoadError: the keys or shapes differ, or a module refuses the layout; the message
            names them (``source`` names the file), as a checkpoint of another model or config would.
    """
    shapes = state_dict_differences(model.state_dict(), state_dict)['shape mismatches']
    if shapes:
        raise CheckpointLoadError(f"{source} does not belong to this config's model: "
                                  + describe_differences({'shape mismatches': shapes}))
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except (RuntimeError, ValueError) as e:  # shapes after a layout conversion, or a layout a module refuses
        raise CheckpointLoadError(f'{source} cannot be loaded: {" ".join(str(e).split())}') from None
    differences = {'missing keys': sorted(result.missing_keys), 'unexpected keys': sorted(result.unexpected_keys)}
    if any(differences.values()):
        raise CheckpointLoadError(f"{source} does not belong to this config's model: "
                                  + describe_differences(differences))


def build_detector(cfg) -> torch.nn.Module:
    """mmdet's ``init_detector`` on CPU, with no backbone init: nothing is downloaded. Changes ``cfg``."""
    import warnings

    from mmdet.apis import init_detector

    cfg.model.backbone.init_cfg = None
    # record=True swallows init_detector's "checkpoint is None, use COCO classes": the weights come later
    with warnings.catch_warnings(record=True):
        return init_detector(cfg, checkpoint=None, device='cpu')


def load_detector(cfg, checkpoint: Optional[str], trust: bool = False) -> torch.nn.Module:
    """Build ``cfg``'s model on CPU (nothing downloaded) and :func:`load_weights` ``checkpoint``; eval mode.

    Raises:
        CheckpointLoadError: the checkpoint is missing, unsafe to load, or of another model.
    """
    model = build_detector(copy.deepcopy(cfg))
    if checkpoint is not None:
        load_weights(model, checkpoint, trust)
    return model.eval()


def load_weights(model: torch.nn.Module, checkpoint: str, trust: bool = False) -> None:
    """Load ``checkpoint`` into a built detector strictly (:func:`load_state_dict_strict`); its class names
    (``meta.dataset_meta.classes``), if it has them, become ``model.dataset_meta['classes']``, as mmdet's
    ``init_detector`` takes them."""
    state = load_checkpoint_file(checkpoint, trust=trust)
    load_state_dict_strict(model, state.get('state_dict', state), f'checkpoint {checkpoint!r}')
    classes = (state.get('meta') or {}).get('dataset_meta', {}).get('classes')
    if classes:
        model.dataset_meta = {**model.dataset_meta, 'classes': classes}


def to_weights_only(obj: Any) -> Any:
    """Return ``obj`` with mmengine's HistoryBuffers and numpy values turned into weights-only types."""
    from mmengine.logging import HistoryBuffer

    if isinstance(obj, HistoryBuffer):
        log, count = obj.data
        return {_BUFFER_TAG: True, 'log': torch.from_numpy(np.asarray(log, dtype=np.float64)),
                'count': torch.from_numpy(np.asarray(count, dtype=np.float64)), 'max_length': obj.max_length}
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (dict, OrderedDict)):
        return type(obj)((k, to_weights_only(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_weights_only(v) for v in obj)
    return obj


def from_weights_only(obj: Any) -> Any:
    """Inverse of :func:`to_weights_only` for the HistoryBuffers (numpy values stay tensors)."""
    from mmengine.logging import HistoryBuffer

    if isinstance(obj, dict) and obj.get(_BUFFER_TAG):
        return HistoryBuffer(obj['log'].numpy(), obj['count'].numpy(), obj['max_length'])
    if isinstance(obj, (dict, OrderedDict)):
        return type(obj)((k, from_weights_only(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [from_weights_only(v) for v in obj]
    return obj


def atomic_write(path: str, write: Callable[[str], None], suffix: str = '') -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it: never a half-written file.

    ``suffix`` ends the temporary name, for writers that take the format from it (``savefig``).
    """
    tmp = f'{path}.tmp-{os.getpid()}{suffix}'
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
