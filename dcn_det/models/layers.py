"""mmcv's deformable conv layers on dcn_det's op: the packs (which predict their own offsets) and the
plain layers (which take offsets from their caller), drop-in replacements for mmcv's four classes.

They subclass :class:`mmcv.ops.DeformConv2dPack` / :class:`mmcv.ops.ModulatedDeformConv2dPack` (and
:class:`mmcv.ops.DeformConv2d` / :class:`mmcv.ops.ModulatedDeformConv2d`), so
that everything keyed on mmcv's classes keeps working: mmengine's
``paramwise_cfg=dict(dcn_offset_lr_mult=...)`` finds ``conv_offset``, the zero initialisation of
``conv_offset`` is mmcv's, mmdet model-zoo checkpoints (``weight``, ``bias``, ``conv_offset.weight``,
``conv_offset.bias``) load key for key, and mmcv's ``_version`` (2) and ``_load_from_state_dict``
are inherited. (Its pre-version-2 renaming of ``<layer>_offset.*`` keys never fires through torch's
or mmengine's loaders, which hand a layer only the keys under its own prefix.) Only ``forward``
changes: it calls :func:`dcn_det.ops.deform_conv2d` with the layer's ``backend``. They live in the
models layer because they build on mmcv (the ops layer needs torch and torchvision only).
:func:`dcn_det.convert_mmcv_ops` turns mmcv's instances into these classes in place.

torch.compile: with the native backend a model containing these layers compiles into one graph
(no graph break, aot_eager and inductor); with ``backend='mmcv'`` dynamo graph-breaks at each
deformable op (mmcv's pybind extension is opaque to it). See :mod:`dcn_det.ops.deform_conv`.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from mmcv.ops import DeformConv2d as _MMCVDeformConv2d
from mmcv.ops import DeformConv2dPack as _MMCVDeformConv2dPack
from mmcv.ops import ModulatedDeformConv2d as _MMCVModulatedDeformConv2d
from mmcv.ops import ModulatedDeformConv2dPack as _MMCVModulatedDeformConv2dPack
from mmdet.registry import MODELS
from torch import Tensor, nn

from dcn_det.ops import BACKEND_CHOICES, deform_conv2d
from dcn_det.ops._common import check_backend
from dcn_det.ops.deform_conv import output_size


class _Layer:
    """What both packs change in mmcv's: the op they call, and loading without mmcv's per-layer log.

    mmcv's packs log "... is upgraded to version 2" for every layer of every current checkpoint
    (their version test is inverted), and their old-key renaming cannot fire (torch hands a layer
    only the keys under its own prefix), so skipping their override changes nothing else.
    """

    layer_name: Optional[str] = None  # set by the model that holds the layer, for error messages
    backend = 'auto'  # what an mmcv instance converted in place (it has no __init__ of ours) runs on

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        nn.Module._load_from_state_dict(self, *args, **kwargs)

    __repr__ = nn.Module.__repr__  # mmcv's DeformConv2d writes its own, without children or backend

    def extra_repr(self) -> str:
        # what torchvision's DeformConv2d shows (mmcv's layers show nothing), and the kernel this one runs on
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, '
             f'stride={tuple(self.stride)}, padding={tuple(self.padding)}, dilation={tuple(self.dilation)}')
        if self.groups != 1:
            s += f', groups={self.groups}'
        if self.deform_groups != 1:
            s += f', deform_groups={self.deform_groups}'
        if getattr(self, 'bias', None) is None:
            s += ', bias=False'
        return s + f', backend={self.backend!r}'

    def _deform_conv2d(self, x: Tensor, offset: Tensor, mask: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        try:
            return deform_conv2d(x, offset, self.weight, bias, self.stride, self.padding, self.dilation,
                                 mask, backend=self.backend)
        except ValueError as e:  # NonFiniteError and the op's shape errors: say which layer
            raise type(e)(f'{self.layer_name or type(self).__name__}: {e}') from None


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

class DeformConv2d(_Layer, _MMCVDeformConv2d):
    """DCNv1 layer whose offsets come from the caller (mmcv's ``DeformConv2d``: VFNet, RepPoints,
    guided anchoring, FoveaBox, Cascade RPN, CentripetalNet heads).

    Args: those of :class:`mmcv.ops.DeformConv2d` (no bias), plus ``backend``.

    Shapes: x (Tensor[N, in_channels, H, W]), offset (Tensor[N, 2 * deform_groups * kh * kw, H_out, W_out])
    -> Tensor[N, out_channels, H_out, W_out].
    """

    def __init__(self, *args, backend: str = 'auto', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = check_backend(backend, BACKEND_CHOICES)

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:  # type: ignore[override]
        # as mmcv's layer: an input smaller than the kernel is zero-padded at the bottom/right (offsets too)
        # and the output cropped back, so that maps of 1-2 pixels (e.g. VFNet's P7 on small images) work
        pad_h, pad_w = max(self.kernel_size[0] - x.size(2), 0), max(self.kernel_size[1] - x.size(3), 0)
        if pad_h or pad_w:
            x, offset = F.pad(x, (0, pad_w, 0, pad_h)), F.pad(offset, (0, pad_w, 0, pad_h))
        out = self._deform_conv2d(x, offset, None, None)
        return out[:, :, :out.size(2) - pad_h, :out.size(3) - pad_w] if pad_h or pad_w else out


class ModulatedDeformConv2d(_Layer, _MMCVModulatedDeformConv2d):
    """DCNv2 layer whose offsets and masks come from the caller (mmcv's ``ModulatedDeformConv2d``, e.g.
    in DyHead).

    Args: those of :class:`mmcv.ops.ModulatedDeformConv2d`, plus ``backend``.

    Shapes: x (Tensor[N, in_channels, H, W]), offset (Tensor[N, 2 * deform_groups * kh * kw, H_out, W_out]),
    mask (Tensor[N, deform_groups * kh * kw, H_out, W_out]) -> Tensor[N, out_channels, H_out, W_out].

    ``reads_offsets_as_mmcv_buffer`` (default False) is mmcv's compatibility reading for offsets and masks
    of another spatial size than the output, which mmcv's kernel accepts without a check (see
    :func:`mmcv_buffer_view`); left False, such a call raises the op's shape error.
    """

    reads_offsets_as_mmcv_buffer = False

    def __init__(self, *args, backend: str = 'auto', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = check_backend(backend, BACKEND_CHOICES)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        if self.reads_offsets_as_mmcv_buffer:
            size = self.output_hw(x)
            offset, mask = mmcv_buffer_view(offset, size), mmcv_buffer_view(mask, size)
        return self._deform_conv2d(x, offset, mask, self.bias)

    def output_hw(self, x: Tensor) -> tuple[int, int]:
        """(H_out, W_out) of this layer for the input ``x`` (Tensor[N, C, H, W])."""
        return output_size(x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        flag = ', reads_offsets_as_mmcv_buffer=True' if self.reads_offsets_as_mmcv_buffer else ''
        return super().extra_repr() + flag


def mmcv_buffer_view(t: Tensor, size: tuple[int, int]) -> Tensor:
    """``t`` (Tensor[N, C, H, W]) as mmcv's deformable conv kernel reads it for an output of ``size``
    (H_out, W_out): each sample's first ``C * H_out * W_out`` values, row-major, viewed as
    Tensor[N, C, H_out, W_out]. The identity when (H, W) is ``size``, and ``t`` unchanged when it holds too
    few values (the op then raises its shape error).

    mmcv's kernel indexes the offset and mask buffers with the output's size and never checks their
    shape. mmdet's DyHead (``necks/dyhead.py``, ``DyHeadBlock``) relies on that: its ``spatial_conv_high``
    runs on the next-coarser level with the offset and mask predicted on the finer one (twice the size),
    so the coarse level reads the first quarter of each sample's buffer (see microsoft/DynamicHead#25 on
    that head's level order). DyHead weights were trained with this reading, so it is kept where
    :func:`dcn_det.convert_mmcv_ops` finds that head; the public op still refuses such shapes.
    """
    n, c = t.shape[:2]
    need = c * size[0] * size[1]
    if tuple(t.shape[2:]) == tuple(size) or t.shape[1:].numel() < need:
        return t
    return t.reshape(n, -1)[:, :need].view(n, c, *size)
