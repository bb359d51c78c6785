"""DCNv1/DCNv2 layers that predict their own offsets, drop-in replacements for mmcv's packs.

They subclass :class:`mmcv.ops.DeformConv2dPack` / :class:`mmcv.ops.ModulatedDeformConv2dPack`, so
that everything keyed on mmcv's classes keeps working: mmengine's
``paramwise_cfg=dict(dcn_offset_lr_mult=...)`` finds ``conv_offset``, mmcv's ``_version`` /
``_load_from_state_dict`` key migration applies, the zero initialisation of ``conv_offset`` is
mmcv's, and mmdet model-zoo checkpoints (``weight``, ``bias``, ``conv_offset.weight``,
``conv_offset.bias``) load key for key. Only ``forward`` changes: it calls
:func:`dcn_det.ops.deform_conv2d` with the layer's ``backend``. They are not registered in any
registry here; the models layer does that.

torch.compile: with the native backend a model containing these layers compiles into one graph
(no graph break, aot_eager and inductor); with ``backend='mmcv'`` dynamo graph-breaks at each
deformable op (mmcv's pybind extension is opaque to it). See :mod:`dcn_det.ops.deform_conv`.
"""
import torch
from mmcv.ops import DeformConv2dPack as _MMCVDeformConv2dPack
from mmcv.ops import ModulatedDeformConv2dPack as _MMCVModulatedDeformConv2dPack
from torch import Tensor

from .deform_conv import check_backend, deform_conv2d


class DeformConv2dPack(_MMCVDeformConv2dPack):
    """DCNv1 layer: ``conv_offset`` (zero-initialised) predicts the offsets from the input.

    Args: those of :class:`mmcv.ops.DeformConv2dPack` (``in_channels``, ``out_channels``,
    ``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups``, ``deform_groups``; like mmcv
    it has no bias), plus ``backend`` (``'auto'``, ``'native'``, ``'mmcv'`` or ``'torchvision'``).

    Shapes: x (Tensor[N, in_channels, H, W]) -> Tensor[N, out_channels, H_out, W_out].
    """

    def __init__(self, *args, backend: str = 'auto', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = check_backend(backend)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        offset = self.conv_offset(x)
        return deform_conv2d(x, offset, self.weight, None, self.stride, self.padding, self.dilation,
                             backend=self.backend)


class ModulatedDeformConv2dPack(_MMCVModulatedDeformConv2dPack):
    """DCNv2 layer: ``conv_offset`` (zero-initialised) predicts offsets and masks from the input.

    At initialisation the offsets are 0 and the masks sigmoid(0) = 0.5, so the layer computes half
    of the plain convolution with the same weight. Args: those of
    :class:`mmcv.ops.ModulatedDeformConv2dPack`, plus ``backend``.

    Shapes: x (Tensor[N, in_channels, H, W]) -> Tensor[N, out_channels, H_out, W_out].
    """

    def __init__(self, *args, backend: str = 'auto', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = check_backend(backend)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        out = self.conv_offset(x)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation,
                             mask, backend=self.backend)

    def extra_repr(self) -> str:
        return f'backend={self.backend!r}'
