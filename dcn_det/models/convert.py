"""``convert_mmcv_ops``: every mmcv deformable layer of a built model on dcn_det's kernels, in place.

mmdet's heads and necks use mmcv's deformable ops directly: ``ResNet(dcn=...)`` backbones, the dpool /
mdpool RoI extractors, VFNet, RepPoints, FoveaBox, Cascade RPN, guided anchoring and CentripetalNet
(``DeformConv2d``), DyHead (``ModulatedDeformConv2d``), CenterNet's neck and SOLOv2's mask head
(``ModulatedDeformConv2dPack``), TOOD (mmcv's functional ``deform_conv2d``), guided anchoring's test
path (``MaskedConv2d``). mmcv 2.1 has slow CPU kernels for the convs and none for RoI pooling or the
masked conv. :func:`convert_mmcv_ops` moves all of them onto :mod:`dcn_det.ops`:

- mmcv's ``DeformConv2dPack``, ``ModulatedDeformConv2dPack``, ``DeformConv2d`` and
  ``ModulatedDeformConv2d`` become the classes of the same names in :mod:`dcn_det.models.layers`;
- mmcv's ``DeformRoIPool``, ``DeformRoIPoolPack``, ``ModulatedDeformRoIPoolPack`` and ``MaskedConv2d``
  become those of :mod:`dcn_det.models.mmcv_layers`;
- mmdet's ``TOODHead`` becomes :class:`TOODHead` here (its ``deform_sampling`` calls dcn_det's op).

Each is a subclass of the class it replaces in which only the call into the kernel changes.

How: each module's ``__class__`` is set to that subclass. The module stays the same object, so its
parameters are the same tensors (an optimizer built before trains them), its state-dict keys and
hooks are unchanged (zoo checkpoints load before or after; a converted model saves in mmdet's
layout), a wrapped model (DDP) is converted through its wrapper, and everything keyed on mmcv's
classes still finds them: mmengine's ``paramwise_cfg=dict(dcn_offset_lr_mult=...)`` looks for
``conv_offset`` only inside subclasses of mmcv's ``DeformConv2d`` / ``ModulatedDeformConv2d``, which
rebuilding the layers as dcn_det's own classes would break. The subclasses keep mmcv's class names.
Their ``backend`` (class default ``'auto'``: native on CPU; on CUDA mmcv's CUDA kernels where mmcv
has them, else torchvision) is what :mod:`dcn_det.ops` dispatches on; the ONNX exporter sets it to
``'torchvision'`` while it traces.

TOOD calls mmcv's functional ``deform_conv2d`` (depthwise, one offset group per channel, 1x1 kernel)
from its head's ``deform_sampling``; that method is the call site converted, per instance, not a
patch of mmcv or of mmdet's class. DyHead's ``spatial_conv_high`` gets offsets and masks of the finer
level, which mmcv's kernel reads as a buffer of the output's size; the converted layer keeps that
reading (:func:`dcn_det.models.layers.mmcv_buffer_view`) for that layer only.

Left alone and named (one warning line, and :func:`mmcv_ops_report`): a subclass of one of these
classes that defines its own ``forward`` (or ``deform_sampling``), an mmcv deformable op dcn_det has
no kernel for (``MultiScaleDeformableAttention``), and any other class whose methods refer to one of
mmcv's deformable functions (``deform_conv2d``, ``modulated_deform_conv2d``, ``deform_roi_pool``,
``masked_conv2d``). A subclass that inherits mmcv's ``forward`` is converted like mmcv's class.
Converting twice changes nothing.

From a config (mmdet's own ``tools/train.py``, ``tools/test.py`` and ``DetInferencer`` included)::

    custom_imports = dict(imports=['dcn_det'], allow_failed_imports=False)
    model = dict(type='ConvertMMCVOps', model_type='FasterRCNN')  # the base config's model type

``ConvertMMCVOps`` is a builder registered in mmdet's ``MODELS``: it builds ``model_type`` with the
rest of ``model`` and returns that model converted. ``model_type={{_base_.model.type}}`` copies the base
config's type. It works at the registry because that is the one step every entry point shares:
``DetInferencer`` builds with ``MODELS.build(cfg.model)`` and runs no hooks, so a Runner hook would miss
it; a wrapper model would put its own prefix on every state-dict key; and the flat form leaves
``cfg.model.backbone`` and the rest where mmdet's ``init_detector`` and tools read them. Importing
dcn_det registers the name and changes no model that does not ask for it.
"""
import collections
import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Optional

from mmcv import ops as mmcv_ops
from mmdet.models.dense_heads import TOODHead as _MMDetTOODHead
from mmdet.models.necks.dyhead import DyHeadBlock
from mmdet.registry import MODELS
from mmengine.logging import print_log
from torch import Tensor, nn

from dcn_det.ops import deform_conv2d

from . import layers, mmcv_layers

CONVERT_TYPE = 'ConvertMMCVOps'


class TOODHead(_MMDetTOODHead):
    """mmdet's ``TOODHead`` whose ``deform_sampling`` runs on dcn_det's op instead of mmcv's functional
    ``deform_conv2d`` (which ``mmdet/models/dense_heads/tood_head.py`` binds at import)."""

    backend = 'auto'

    def deform_sampling(self, feat: Tensor, offset: Tensor) -> Tensor:
        """Bilinear sampling of each channel at its own offsets: a depthwise 1x1 deformable conv with
        unit weights and one offset group per channel.

        feat (Tensor[N, C, H, W]), offset (Tensor[N, 2 * C, H, W]) -> Tensor[N, C, H, W].
        """
        weight = feat.new_ones(feat.size(1), 1, 1, 1)
        return deform_conv2d(feat, offset, weight, None, 1, 0, 1, backend=self.backend)


# (mmcv or mmdet class, the dcn_det subclass it becomes, the method that calls the kernel), subclasses first
_CONVERSIONS = (
    (mmcv_ops.DeformConv2dPack, layers.DeformConv2dPack, 'forward'),
    (mmcv_ops.ModulatedDeformConv2dPack, layers.ModulatedDeformConv2dPack, 'forward'),
    (mmcv_ops.DeformConv2d, layers.DeformConv2d, 'forward'),
    (mmcv_ops.ModulatedDeformConv2d, layers.ModulatedDeformConv2d, 'forward'),
    (mmcv_ops.DeformRoIPoolPack, mmcv_layers.DeformRoIPoolPack, 'forward'),
    (mmcv_ops.ModulatedDeformRoIPoolPack, mmcv_layers.ModulatedDeformRoIPoolPack, 'forward'),
    (mmcv_ops.DeformRoIPool, mmcv_layers.DeformRoIPool, 'forward'),
    (mmcv_ops.MaskedConv2d, mmcv_layers.MaskedConv2d, 'forward'),
    (_MMDetTOODHead, TOODHead, 'deform_sampling'),
)
# mmcv's functions that reach its deformable kernels, for naming code that calls them directly
_MMCV_FUNCTIONS = {getattr(mmcv_ops, name): name for name in
                   ('deform_conv2d', 'modulated_deform_conv2d', 'deform_roi_pool', 'masked_conv2d')}
_MMCV_FUNCTION_NAMES = set(_MMCV_FUNCTIONS.values())
_SKIP_MODULES = ('dcn_det', 'torch', 'mmcv', 'mmengine', 'builtins')


@dataclass
class MMCVOpsReport:
    """Where a model's deformable layers and call sites run, by class name and count.

    ``dcn_det``: on dcn_det's kernels; ``mmcv``: mmcv's layers that :func:`convert_mmcv_ops` would
    convert; ``left``: those it leaves on mmcv's code, with the reason in ``reasons``.
    """

    dcn_det: collections.Counter = field(default_factory=collections.Counter)
    mmcv: collections.Counter = field(default_factory=collections.Counter)
    left: collections.Counter = field(default_factory=collections.Counter)
    reasons: dict = field(default_factory=dict)

    def left_line(self) -> str:
        """The layers left on mmcv, in one line ('' if none)."""
        return '; '.join(f'{n} {name} ({self.reasons[name]})' for name, n in sorted(self.left.items()))


def mmcv_ops_report(model: nn.Module) -> MMCVOpsReport:
    """What runs on mmcv's deformable kernels in ``model`` and what on dcn_det's; changes nothing."""
    report = MMCVOpsReport()
    for _, module in model.named_modules():
        kind, name, detail = _plan(type(module))
        if kind == 'left':
            report.reasons[name] = detail
        if kind is not None:
            getattr(report, kind)[name] += 1
    return report


def convert_mmcv_ops(model: nn.Module) -> nn.Module:
    """Run every mmcv deformable layer of ``model`` (and TOOD's functional call) on dcn_det's kernels.

    In place, as described in :mod:`dcn_det.models.convert`: same module objects, same parameter
    tensors, same state-dict keys; mmcv's classes stay base classes. Logs one line of what it converted
    and what it left (a warning when anything stays on mmcv's kernels); :func:`mmcv_ops_report` tells
    the same. Idempotent.

    Args:
        model (nn.Module): any built model (an mmdet detector, a backbone, a wrapped model).

    Returns:
        nn.Module: ``model`` itself.
    """
    converted = collections.Counter()
    for path, module in model.named_modules():
        kind, name, target = _plan(type(module))
        if kind == 'mmcv':
            module.__class__ = target
            converted[name] += 1
        if kind in ('mmcv', 'dcn_det') and hasattr(type(module), 'layer_name'):
            module.layer_name = path or type(module).__name__
    mmcv_reading = _keep_dyhead_offset_reading(model)
    report = mmcv_ops_report(model)
    done = ', '.join(f'{n} {name}' for name, n in sorted(converted.items())) or 'nothing'
    line = f'convert_mmcv_ops: converted {done} to dcn_det\'s kernels ({sum(report.dcn_det.values())} in all)'
    if mmcv_reading:
        line += f"; {mmcv_reading} DyHead spatial_conv_high layers read the finer level's offsets as mmcv does"
    if report.left:
        print_log(f'{line}; LEFT on mmcv: {report.left_line()}', logger='current', level=logging.WARNING)
    else:
        print_log(line, logger='current')
    return model


@MODELS.register_module(CONVERT_TYPE)
def build_on_dcn_det_kernels(model_type: Optional[str] = None, **model_cfg) -> nn.Module:
    """Build ``dict(type=model_type, **model_cfg)`` from ``MODELS`` and return it converted
    (:func:`convert_mmcv_ops`). Registered as ``'ConvertMMCVOps'``: see :mod:`dcn_det.models.convert`."""
    if not model_type:
        raise ValueError(f"type='{CONVERT_TYPE}' needs model_type, the type of the model to build, e.g. "
                         f"model = dict(type='{CONVERT_TYPE}', model_type='FasterRCNN')")
    return convert_mmcv_ops(MODELS.build(dict(model_cfg, type=model_type)))


def set_conversion(cfg, convert: bool) -> None:
    """Make ``cfg`` (an mmengine Config) build its model converted (``convert``) or on mmcv's kernels,
    whatever it said; converted, it also imports dcn_det, so that mmdet's tools can run the config."""
    model = cfg.model
    if convert and model.get('type') != CONVERT_TYPE:
        model['model_type'], model['type'] = model['type'], CONVERT_TYPE
        imports = dict(cfg.get('custom_imports') or dict(allow_failed_imports=False))
        names = list(imports.get('imports', []))
        if 'dcn_det' not in names:
            cfg.custom_imports = dict(imports, imports=names + ['dcn_det'])
    elif not convert and model.get('type') == CONVERT_TYPE:
        model['type'] = model.pop('model_type')


@functools.lru_cache(maxsize=None)
def _plan(cls: type) -> tuple[Optional[str], str, object]:
    """(kind, name, detail) for a module class: kind is 'dcn_det', 'mmcv' (detail: the class it becomes),
    'left' (detail: why) or None (not a deformable layer)."""
    for base, target, method in _CONVERSIONS:
        if not issubclass(cls, base):
            continue
        name = base.__name__ if method == 'forward' else f'{base.__name__}.{method}'
        if issubclass(cls, target) or cls.__module__.split('.')[0] == 'dcn_det':
            return 'dcn_det', name, None
        if cls is base:
            return 'mmcv', name, target
        if getattr(cls, method) is not getattr(base, method):
            return 'left', cls.__name__, f'a subclass of {base.__name__} with its own {method}'
        return 'mmcv', name, _converted_subclass(cls, target)
    if cls.__module__.startswith('mmcv.ops') and ('Deform' in cls.__name__ or 'Masked' in cls.__name__):
        return 'left', cls.__name__, f'no dcn_det kernel for {cls.__module__}'
    called = _mmcv_functions_called(cls)
    if called:
        return 'left', cls.__name__, f'calls mmcv.ops.{"/".join(called)} directly'
    return None, cls.__name__, None


def _mmcv_functions_called(cls: type) -> list:
    """Names of mmcv's deformable functions that the methods ``cls`` runs refer to (through a global name
    bound to one, or as an attribute of ``mmcv.ops``), outside dcn_det, torch, mmcv and mmengine."""
    called = set()
    for attr in dir(cls):
        func = inspect.getattr_static(cls, attr)
        func = getattr(func, '__func__', func)  # staticmethod / classmethod
        code = getattr(func, '__code__', None)
        if code is None or getattr(func, '__module__', None) is None \
                or func.__module__.split('.')[0] in _SKIP_MODULES:
            continue
        names = _code_names(code)
        namespace = func.__globals__
        bound = [namespace.get(n) for n in names]
        called.update(_MMCV_FUNCTIONS[v] for v in bound if _is_mmcv_function(v))
        if any(v is mmcv_ops for v in bound):
            called.update(n for n in names if n in _MMCV_FUNCTION_NAMES)
    return sorted(called)


def _code_names(code) -> set:
    """The global and attribute names a code object (and the code nested in it) uses."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, 'co_names'):
            names |= _code_names(const)
    return names


def _is_mmcv_function(value: object) -> bool:
    try:
        return value in _MMCV_FUNCTIONS
    except TypeError:  # unhashable
        return False


_SUBCLASSES: dict = {}


def _converted_subclass(cls: type, target: type) -> type:
    """``cls`` (a subclass of an mmcv layer that inherits its forward) with ``target``'s forward."""
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(cls.__name__, (target, cls), {'__module__': __name__, '__doc__': cls.__doc__})
    return _SUBCLASSES[cls]


def _keep_dyhead_offset_reading(model: nn.Module) -> int:
    """Give each converted DyHead ``spatial_conv_high`` mmcv's reading of its offsets; returns how many."""
    count = 0
    for module in model.modules():
        conv = getattr(getattr(module, 'spatial_conv_high', None), 'conv', None) \
            if isinstance(module, DyHeadBlock) else None
        if isinstance(conv, layers.ModulatedDeformConv2d):
            conv.reads_offsets_as_mmcv_buffer = True
            count += 1
    return count
