"""ONNX translations of dcn_det's custom ops, for ``torch.onnx.export(..., dynamo=True)``.

``torch.ops.dcn_det.deform_conv2d`` (the native deformable conv, :mod:`dcn_det.ops.deform_conv`)
has the semantics of ONNX's standard ``DeformConv`` (opset 19: the same offset layout, the same edge
rule, the mask multiplying each sample), so a model that keeps its deformable convs on the native backend
exports to standard ONNX with::

    torch.onnx.export(model, args, f, dynamo=True, opset_version=19,
                      custom_translation_table=dcn_det.deploy.CUSTOM_TRANSLATIONS)

(``tools/export_onnx.py`` switches the layers to torchvision's kernels instead, which the exporter
translates to the same ``DeformConv`` node.)
"""
from typing import Optional, Sequence

import torch
from onnxscript.onnx_opset import opset19


def deform_conv2d(input, offset, mask: Optional = None, weight=None, bias: Optional = None,
                  stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                  dilation: Sequence[int] = (1, 1), groups: int = 1, offset_groups: int = 1):
    """``dcn_det::deform_conv2d`` as ONNX ``DeformConv`` (opset 19)."""
    return opset19.DeformConv(X=input, W=weight, offset=offset, B=bias, mask=mask, dilations=tuple(dilation),
                              strides=tuple(stride), pads=(padding[0], padding[1], padding[0], padding[1]),
                              group=groups, offset_group=offset_groups)


CUSTOM_TRANSLATIONS = {torch.ops.dcn_det.deform_conv2d.default: deform_conv2d}
