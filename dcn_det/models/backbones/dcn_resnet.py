"""ResNet whose 3x3 convs in chosen stages are (modulated) deformable convs, in mmdet's own layout."""
import os.path as osp
from collections.abc import Mapping
from types import MappingProxyType
from typing import Optional, Sequence

import torch
from mmcv.cnn import build_conv_layer
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from mmdet.registry import MODELS
from mmengine.logging import print_log
from torch import Tensor

from dcn_det.checkpoint import describe_differences, load_checkpoint_file, state_dict_differences
from dcn_det.models.layers import DeformConv2dPack, ModulatedDeformConv2dPack

# The `dcn.type` names DCNResNet takes: its layers' names in the registry, and mmdet's for the same layers
# (which name mmcv's packs in the registry), so that an mmdet `dcn=dict(type='DCNv2', ...)` config keeps working.
DCN_LAYERS = {name: cls for name, cls in MODELS.module_dict.items()
              if cls in (ModulatedDeformConv2dPack, DeformConv2dPack)}
DCN_LAYERS.update(DCNv2=ModulatedDeformConv2dPack, DCN=DeformConv2dPack)

DEFAULT_DCN = MappingProxyType(dict(type='MDConv', deform_groups=1))  # read-only: a safe default


def _resolve_dcn(dcn: Optional[dict]) -> Optional[dict]:
    if dcn is None:
        return None
    if not isinstance(dcn, Mapping) or 'type' not in dcn:
        raise TypeError(f"dcn must be None or a dict with a 'type', e.g. dict(type='MDConv'), got {dcn!r}")
    dcn = dict(dcn)
    if isinstance(dcn['type'], str):
        if dcn['type'] not in DCN_LAYERS:
            raise ValueError(f"dcn type {dcn['type']!r} is not supported: use one of {sorted(DCN_LAYERS)} "
                             "('MDConv'/'DCNv2' = modulated DCNv2, 'DConv'/'DCN' = DCNv1)")
        dcn['type'] = DCN_LAYERS[dcn['type']]
    return dcn


class DCNBottleneck(Bottleneck):
    """mmdet's Bottleneck where ``fallback_on_stride`` means what it says.

    mmdet's Bottleneck pops ``fallback_on_stride`` from the dict that ResLayer hands every block of
    a stage, so only the first block sees it, and that block then falls back whatever its stride.
    Here each block reads its own copy: ``conv2`` stays dense exactly when the flag is set and
    ``conv2`` is strided (the first block of a stage, pytorch style).
    """

    def __init__(self, *args, dcn: Optional[dict] = None, **kwargs) -> None:
        if dcn is not None:
            dcn = dict(dcn)
            stride = kwargs.get('stride', args[2] if len(args) > 2 else 1)
            conv2_strided = stride > 1 and kwargs.get('style', 'pytorch') == 'pytorch'
            if dcn.pop('fallback_on_stride', False) and conv2_strided:
                dcn = None
        super().__init__(*args, dcn=dcn, **kwargs)


class DCNBasicBlock(BasicBlock):
    """mmdet's BasicBlock with an optional deformable ``conv2`` (mmdet and detectron2 refuse DCN here).

    ``conv2`` is the block's stride-1 3x3 conv, so its state-dict keys follow the Bottleneck's
    (``layerX.Y.conv2.conv_offset.*``); ``conv1``, which carries the stage's stride, stays dense.
    """

    def __init__(self, inplanes: int, planes: int, *args, dcn: Optional[dict] = None, **kwargs) -> None:
        super().__init__(inplanes, planes, *args, dcn=None, **kwargs)
        if dcn is not None:
            dcn = dict(dcn)
            dcn.pop('fallback_on_stride', None)  # conv2 has stride 1: nothing to fall back from
            self.conv2 = build_conv_layer(dcn, planes, planes, 3, padding=1, bias=False)


@MODELS.register_module()
class DCNResNet(ResNet):
    """ResNet with modulated deformable convs (DCNv2) in the 3x3 convs of the chosen stages.

    A drop-in for mmdet's ``ResNet``: same arguments, outputs and state-dict keys; a checkpoint of
    mmdet's ``ResNet(depth=50, dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
    stage_with_dcn=(False, True, True, True))`` loads strictly. Differences: the deformable layers
    run on :mod:`dcn_det.ops` (fast on CPU, mmcv's kernels on CUDA), BasicBlock (R18/R34) takes DCN
    too, and a ``Pretrained`` init from a plain ResNet (torchvision or mmdet layout) reports the
    offset predictors it leaves at zero in one line.

    Args:
        depth (int): 18, 34, 50, 101 or 152.
        dcn (dict | None): the deformable layer: ``type`` 'MDConv' (DCNv2, default) or 'DConv'
            (DCNv1), mmdet's 'DCNv2'/'DCN' accepted as aliases; ``deform_groups``; ``backend``
            ('auto', 'native', 'mmcv', 'torchvision'); ``fallback_on_stride`` (keep strided 3x3
            convs dense). None: a plain ResNet.
        stage_with_dcn (Sequence[bool]): which of c2..c5 get DCN. Default c3-c5.
        channels_last (bool): compute in channels-last memory, the layout oneDNN's CPU convolutions
            and dcn_det's deformable ops work in, and return the usual contiguous NCHW outputs (same
            values), so that necks, heads and mmcv's ops (whose CPU RoIAlign misreads channels-last
            memory) see mmdet's layout. Default False; the CPU demo configs set it, for faster
            training steps (docs/speed.md).
        **kwargs: everything mmdet's ``ResNet`` takes (``out_indices``, ``frozen_stages``,
            ``norm_cfg``, ``norm_eval``, ``style``, ``base_channels``, ``init_cfg`` ...).

    Inputs: ``x (Tensor[N, 3, H, W])``. Outputs: a tuple with one ``Tensor[N, C_i, H / s_i, W / s_i]``
    per ``out_indices`` entry, strides 4, 8, 16, 32, ``C_i = base_channels * 2**i * expansion``.

    Example:
        >>> import torch
        >>> from dcn_det.models import DCNResNet
        >>> self = DCNResNet(depth=18)
        >>> self.eval()
        >>> inputs = torch.rand(1, 3, 32, 32)
        >>> level_outputs = self.forward(inputs)
        >>> for level_out in level_outputs:
        ...     print(tuple(level_out.shape))
        (1, 64, 8, 8)
        (1, 128, 4, 4)
        (1, 256, 2, 2)
        (1, 512, 1, 1)
    """

    arch_settings = {
        18: (DCNBasicBlock, (2, 2, 2, 2)),
        34: (DCNBasicBlock, (3, 4, 6, 3)),
        50: (DCNBottleneck, (3, 4, 6, 3)),
        101: (DCNBottleneck, (3, 4, 23, 3)),
        152: (DCNBottleneck, (3, 8, 36, 3)),
    }

    def __init__(self,
                 depth: int,
                 dcn: Optional[dict] = DEFAULT_DCN,
                 stage_with_dcn: Sequence[bool] = (False, True, True, True),
                 channels_last: bool = False,
                 **kwargs) -> None:
        if depth not in self.arch_settings:
            raise ValueError(f'DCNResNet depth must be one of {sorted(self.arch_settings)}, got {depth}')
        num_stages = kwargs.get('num_stages', 4)
        if dcn is not None and len(stage_with_dcn) != num_stages:
            raise ValueError(f'stage_with_dcn needs one flag per stage ({num_stages}), got {tuple(stage_with_dcn)}')
        default_init = kwargs.get('init_cfg') is None and kwargs.get('pretrained') is None
        super().__init__(depth, dcn=_resolve_dcn(dcn), stage_with_dcn=tuple(stage_with_dcn), **kwargs)
        self.channels_last = channels_last
        for name, module in self.named_modules():  # a NaN offset then names its layer as the detector's keys do
            if isinstance(module, (DeformConv2dPack, ModulatedDeformConv2dPack)):
                module.layer_name = f'backbone.{name}'
        # mmdet zero-inits each block's last norm only if `block is Bottleneck/BasicBlock`, which our
        # subclasses fail: apply the same init explicitly.
        if default_init and self.zero_init_residual:
            last_norm = 'norm3' if self.block is DCNBottleneck else 'norm2'
            for layer_name in self.res_layers:
                for block in getattr(self, layer_name):
                    block.init_cfg = dict(type='Constant', val=0, override=dict(name=last_norm))

    def forward(self, x: Tensor) -> tuple:
        if not self.channels_last:
            return super().forward(x)
        outs = super().forward(x.contiguous(memory_format=torch.channels_last))
        return tuple(out.contiguous() for out in outs)

    def train(self, mode: bool = True) -> 'DCNResNet':
        super().train(mode)
        return self  # mmdet's ResNet.train returns None, which breaks `model.eval()(x)` chains

    def _is_pretrained_init(self) -> bool:
        return isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained'

    def init_weights(self) -> None:
        """Random init as mmdet's ResNet, or load a plain/deformable ResNet checkpoint.

        A ``Pretrained`` checkpoint may be torchvision's (``fc.*`` is ignored), mmdet's backbone
        layout, a whole detector checkpoint (pass ``prefix='backbone.'``) or one written by
        ``tools/export_backbone.py``. Offset predictors it lacks keep their zero init; any other
        missing or unexpected key is an error.
        """
        if not self._is_pretrained_init():
            super().init_weights()
            return
        path = self.init_cfg['checkpoint']
        if not osp.isfile(path):
            raise FileNotFoundError(
                f'pretrained backbone checkpoint {path!r} not found: convert torchvision\'s ResNet as the '
                "README's 'Pretrained weights' section shows, or set model.backbone.init_cfg=None to "
                'train from scratch')
        state = load_checkpoint_file(path)
        state = state.get('state_dict', state)
        prefix = self.init_cfg.get('prefix')
        if prefix:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not state:
                raise KeyError(f'no key of {path!r} starts with prefix {prefix!r}')
        state = {k: v for k, v in state.items() if not k.startswith('fc.')}  # torchvision's classifier
        differences = state_dict_differences(self.state_dict(), state)
        offsets = [k for k in differences['missing keys'] if '.conv_offset.' in k]
        differences['missing keys'] = [k for k in differences['missing keys'] if '.conv_offset.' not in k]
        if any(differences.values()):
            raise KeyError(f'{path!r} is not a ResNet-{self.depth} checkpoint for this layout (base_channels='
                           f'{self.base_channels}): ' + describe_differences(differences))
        self.load_state_dict(state, strict=False)
        layers = sorted({k.rsplit('.conv_offset.', 1)[0] for k in offsets})
        note = (f'; {len(layers)} deformable layers have no offset predictor in it and start from '
                f'zero offsets ({layers[0]} ... {layers[-1]})' if layers else '')
        print_log(f'DCNResNet: loaded {path}{note}', logger='current')
        self._is_init = True
