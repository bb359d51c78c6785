"""DCNv1/DCNv2 conv layers that predict their own offsets, drop-in replacements for mmcv's packs.

They subclass :class:`mmcv.ops.DeformConv2dPack` / :class:`mmcv.ops.ModulatedDeformConv2dPack`, so
that everything keyed on mmcv's classes keeps working: mmengine's
``paramwise_cfg=dict(dcn_offset_lr_mult=...)`` finds ``conv_offset``, the zero initialisation of
``conv_offset`` is mmcv's, mmdet model-zoo checkpoints (``weight``, ``bias``, ``conv_offset.weight``,
``conv_offset.bias``) load key for key, and mmcv's ``_version`` (2) and ``_load_from_state_dict``
are inherited. (Its pre-version-2 renaming of ``<layer>_offset.*`` keys never fires through torch's
or mmengine's loaders, which hand a layer only the keys under its own prefix.) Only ``forward``
changes: it calls :func:`dcn_det.ops.deform_conv2d` with the layer's ``backend``. They live in the
models layer because they build on mmcv (the ops layer needs torch and torchvision only).

torch.compile: with the native backend a model containing these layers compiles into one graph
(no graph break, aot_eager and inductor); with ``backend='mmcv'`` dynamo graph-breaks at each
deformable op (mmcv's pybind extension is opaque to it). See :mod:`dcn_det.ops.deform_conv`.
"""
from typing import Optional

import torch
from mmcv.ops import DeformConv2dPack as _MMCVDeformConv2dPack
from mmcv.ops import ModulatedDeformConv2dPack as _MMCVModulatedDeformConv2dPack
from mmdet.registry import MODELS
from torch import Tensor, nn

from dcn_det.ops import BACKEND_CHOICES, NonFiniteError, deform_conv2d
from dcn_det.ops._common import check_backend


class _Layer:
    """What both packs change in mmcv's: the op they call, and loading without mmcv's per-layer log.

    mmcv's packs log "... is upgraded to version 2" for every layer of every current checkpoint
    (their version test is inverted), and their old-key renaming cannot fire (torch hands a layer
    only the keys under its own prefix), so skipping their override changes nothing else.
    """

    layer_name: Optional[str] = None  # set by the model that holds the layer, for error messages

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        nn.Module._load_from_state_dict(self, *args, **kwargs)

    def _deform_conv2d(self, x: Tensor, offset: Tensor, mask: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        try:
            return deform_conv2d(x, offset, self.weight, bias, self.stride, self.padding, self.dilation,
                                 mask, backend=self.backend)
        except NonFiniteError as e:
            raise NonFiniteError(f'{self.layer_name or type(self).__name__}: {e}') from None


# Short aliases as in mmdet's config names (mdconv / dconv); mmcv's own 'DCNv2'/'DCN' stay mmcv's.
@MODELS.register_module('DConv')
class DeformConv2dPack(_Layer, _MMCVDeformConv2dPack):
    """DCNv1 layer: ``conv_offset`` (zero-initialised) predicts the offsets from the input.

    Args: those of :class:`mmcv.ops.DeformConv2dPack` (``in_channels``, ``out_channels``,
    ``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups``, ``deform_groups``; like mmcv
    it has no bias), plus ``backend`` (``'auto'``, ``'native'``, ``'mmcv'`` or ``'torchvision'``).

    Shapes: x (Tensor[N, in_channels, H, W]) -> Tensor[N, out_channels, H_out, W_out].
    """

    def __init__(self, *args, backend: str = 'auto', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = check_backend(backend, BACKEND_CHOICES)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self._deform_conv2d(x, self.conv_offset(x), None, None)  # mmcv's DCNv1 has no bias


@MODELS.register_module('MDConv')
class ModulatedDeformConv2dPack(_Layer, _MMCVModulatedDeformConv2dPack):
    """DCNv2 layer: ``conv_offset`` (zero-initialised) predicts offsets and masks from the input.

    At initialisation the offsets are 0 and the masks sigmoid(0) = 0.5, so the layer computes half
    of the plain convolution with the same weight. Args: those of
    :class:`mmcv.ops.ModulatedDeformConv2dPack`, plus ``backend``.

    Shapes: x (Tensor[N, in_channels, H, W]) -> Tensor[N, out_channels, H_out, W_out].
    """

    def __init__(self, *args, backend: str = 'auto', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = check_backend(backend, BACKEND_CHOICES)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        out = self.conv_offset(x)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        return self._deform_conv2d(x, offset, torch.sigmoid(mask), self.bias)

    def extra_repr(self) -> str:
        return f'backend={self.backend!r}'
