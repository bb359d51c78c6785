"""The native deformable conv op exports through its ONNX translation and runs in onnxruntime."""
import onnx
import onnxruntime as ort
import torch
from torch import nn

from dcn_det.deploy import CUSTOM_TRANSLATIONS, check_standard
from dcn_det.ops import deform_conv2d


class _Net(nn.Module):
    """A modulated deformable conv with two offset groups, stride 2, on the native backend."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Conv2d(8, 3 * 2 * 9, 3, stride=2, padding=1)
        nn.init.normal_(self.offset.weight, std=0.3)
        self.weight = nn.Parameter(torch.randn(6, 8, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x):
        out = self.offset(x)
        offset, mask = out[:, :36], out[:, 36:].sigmoid()
        return deform_conv2d(x, offset, self.weight, self.bias, stride=2, padding=1, mask=mask, backend='native')


def test_native_op_exports_to_deform_conv_and_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(2, 8, 11, 9)
    path = str(tmp_path / 'dcn.onnx')
    torch.onnx.export(model, (x,), path, dynamo=True, opset_version=19, custom_translation_table=CUSTOM_TRANSLATIONS)
    graph = onnx.load(path)
    assert [n.op_type for n in graph.graph.node if n.op_type == 'DeformConv'] == ['DeformConv']
    check_standard(graph)  # no custom-domain node left
    out = ort.InferenceSession(path, providers=['CPUExecutionProvider']).run(None, {graph.graph.input[0].name:
                                                                                    x.numpy()})[0]
    with torch.no_grad():
        expected = model(x)
    assert expected.abs().max() > 1  # not a vacuous comparison
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4)
