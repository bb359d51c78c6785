"""Mixed precision on a CPU: bfloat16 autocast over a detector, float32 where it must stay float32.

mmengine's ``AmpOptimWrapper`` runs on accelerators only (CUDA, NPU, MLU, MUSA). On a CPU whose cores
compute bfloat16 natively (AVX512-BF16 or AMX; :func:`dcn_det.ops.cpu_has_native_bf16`), bfloat16 autocast
makes the convolutions, dense and deformable, about twice as fast or more. What cannot take bfloat16 is
what follows the convolutions in a detector: mmcv's CPU NMS and RoIAlign are float32 kernels ("expected
scalar type Float but found BFloat16"), and box coding, IoU-based assignment and the losses lose accuracy in
bfloat16. :func:`keep_float32` runs those in float32, outside autocast, so that only the feature
extraction and the heads' layers run in bfloat16:

- every head's ``loss_by_feat`` and ``predict_by_feat`` (dense heads: RPN, RetinaNet, ...; mask heads),
  ``loss_and_target`` and ``refine_bboxes`` (RoI box and mask heads, the cascade's refinement);
- every RoI extractor's ``forward`` (mmcv's RoIAlign), so that its features, RoIs and pooling run in
  float32; an extractor of dcn_det's deformable RoI pooling layers only gets float32 features but stays
  under autocast: the op pools in float32 by itself, and its offset predictor's fc layers run in bfloat16.

Their tensor arguments are cast to float32 on the way in. Training: ``optim_wrapper =
dict(type='CPUAmpOptimWrapper', optimizer=...)`` (what ``tools/train.py --amp`` sets on a CPU); testing:
``test_cfg = dict(type='TestLoop', fp16=True)`` with :func:`keep_float32` applied to the model
(``tools/test.py --amp``).
"""
import contextlib
import functools
import types
from typing import Any, Callable, Iterator

import torch
from mmdet.models.roi_heads.roi_extractors import BaseRoIExtractor
from mmdet.registry import OPTIM_WRAPPERS
from mmengine.optim import OptimWrapper
from torch import nn

from dcn_det.ops import DeformRoIPool, cpu_has_native_bf16

FLOAT32_METHODS = ('loss_by_feat', 'predict_by_feat', 'loss_and_target', 'refine_bboxes')
NO_NATIVE_BF16 = ('this CPU has no native bfloat16 (no AVX512-BF16 or AMX-BF16 in /proc/cpuinfo), where bfloat16 '
                  'autocast is slower than float32: run without --amp')


def check_cpu_amp() -> None:
    """RuntimeError naming the reason when this CPU cannot run bfloat16 mixed precision faster."""
    if not cpu_has_native_bf16():
        raise RuntimeError(NO_NATIVE_BF16)


def _as_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if isinstance(value, (list, tuple)) and not hasattr(value, '_fields'):
        return type(value)(_as_float32(v) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _as_float32(v)) for k, v in value.items())
    return value


def _float32(func: Callable, autocast_off: bool = True) -> Callable:
    """``func`` (a method's function) run with float32 tensor arguments and CPU autocast off (or left as it
    is)."""
    @functools.wraps(func)
    def method(self, *args, **kwargs):
        with torch.autocast('cpu', enabled=False) if autocast_off else contextlib.nullcontext():
            return func(self, *_as_float32(args), **_as_float32(kwargs))
    method.keeps_float32 = True
    return method


def keep_float32(model: nn.Module) -> int:
    """Make ``model``'s NMS, RoI pooling, box coding, assignment and losses run in float32 under CPU
    autocast (module docstring); idempotent. Returns the number of methods it wrapped.

    Each wrapped method is an instance attribute bound to its module (:class:`types.MethodType`), so a
    deep copy of the model (an EMA copy) keeps it, bound to the copy.
    """
    count = 0
    for module in model.modules():
        names = [name for name in FLOAT32_METHODS if callable(getattr(type(module), name, None))]
        own_pooling = False
        if isinstance(module, BaseRoIExtractor):
            names.append('forward')
            own_pooling = all(isinstance(layer, DeformRoIPool) for layer in module.roi_layers)
        for name in names:
            if getattr(getattr(module, name), 'keeps_float32', False):
                continue
            autocast_off = not (own_pooling and name == 'forward')
            setattr(module, name, types.MethodType(_float32(getattr(type(module), name), autocast_off), module))
            count += 1
    return count


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """mmengine's :class:`~mmengine.optim.OptimWrapper` with bfloat16 autocast on the CPU around each
    forward (no loss scaling: bfloat16 has float32's range), the detector's float32 parts kept so by
    :func:`keep_float32`. Refuses a CPU without native bfloat16 (:func:`check_cpu_amp`)."""

    def __init__(self, **kwargs) -> None:
        check_cpu_amp()
        super().__init__(**kwargs)

    @contextlib.contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        keep_float32(model)
        with super().optim_context(model), torch.autocast('cpu', dtype=torch.bfloat16):
            yield
