"""How closely onnxruntime reproduces PyTorch, layer by layer, for a model's deformable layers.

:func:`layer_agreement` runs the detector once on real inputs with its own kernels, records what each
deformable layer (conv or RoI pooling) received and returned, exports that layer alone exactly as
:func:`~dcn_det.deploy.export_onnx` exports it (torchvision kernels -> ``DeformConv`` / ``RoiAlign``),
runs it in onnxruntime on the recorded input and compares. The error is relative to the layer's
output scale: ``max |ort - torch| / max |torch|``.
"""
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .detector import export_kernels, exportable_layers
from .export import MIN_OPSET, _quiet_exporter


class _Bound(nn.Module):
    """A layer with the non-tensor arguments of a recorded call fixed (a shared RoI offset predictor)."""

    def __init__(self, layer: nn.Module, extra: tuple) -> None:
        super().__init__()
        self.layer = layer
        self.extra = nn.ModuleList([m for m in extra if isinstance(m, nn.Module)])

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.layer(*tensors, *self.extra)


def layer_agreement(detector: nn.Module, run: Callable[[], object], names: Optional[Sequence[str]] = None,
                    opset: int = MIN_OPSET) -> dict[str, dict]:
    """``{layer name: {'kind', 'rel_err', 'abs_err', 'scale', 'shape'}}`` for each of ``detector``'s
    deformable layers (or those in ``names``) that runs while ``run()`` runs the detector once (PyTorch,
    the layers' own kernels; a RoI pooling level that receives no RoI is not compared)."""
    import onnxruntime as ort

    layers = {name: m for name, m in exportable_layers(detector).items()
              if hasattr(m, 'backend') and (names is None or name in names)}
    calls = {}

    def recorder(name):
        def hook(module, args, output):
            if name not in calls:  # the first call: enough to compare kernels
                inputs = [a.detach().clone() if isinstance(a, Tensor) else a for a in args]
                calls[name] = (inputs, output.detach().clone())
        return hook

    handles = [m.register_forward_hook(recorder(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    results = {}
    for name, (args, expected) in calls.items():
        tensors = tuple(a for a in args if isinstance(a, Tensor))
        module = _Bound(layers[name], tuple(a for a in args if not isinstance(a, Tensor))).eval()
        with torch.no_grad(), export_kernels(module), _quiet_exporter():
            program = torch.onnx.export(module, tensors, dynamo=True, opset_version=opset, report=False,
                                        verbose=False)
        session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=['CPUExecutionProvider'])
        got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), tensors, strict=True)})[0]
        want = expected.numpy()
        scale = float(np.abs(want).max()) if want.size else 0.0
        err = float(np.abs(got - want).max()) if want.size else 0.0
        results[name] = dict(kind=type(layers[name]).__name__, rel_err=err / scale if scale else err, abs_err=err,
                             scale=scale, shape=list(want.shape))
    return results
