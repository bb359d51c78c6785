"""Deployment: a dcn_det (or mmdet) Faster R-CNN as one standard ONNX file or OpenVINO IR, run on images in
onnxruntime, OpenVINO or PyTorch.

Layering: this package uses ``dcn_det.ops``/``dcn_det.models``, mmdet, torch/torchvision and onnx,
onnxscript, onnxruntime, openvino; nothing below it imports it. The tools ``export_onnx.py``, ``export_openvino.py``,
``infer.py`` and ``test.py --onnx/--openvino`` are thin command lines over it.
"""
from .backends import (
                       DeployedDetector,
                       ModelMismatchError,
                       OnnxDetector,
                       OpenVinoDetector,
                       TorchDetector,
                       onnx_eval_model,
                       open_deployed,
)
from .detections import Detections, count_unmatched, paste_masks
from .detector import DeployableDetector, NotExportableError, check_exportable, export_kernels
from .export import MIN_OPSET, ExportResult, check_standard, export_onnx, read_metadata
from .metadata import INPUT_NAMES, META, OUTPUT_NAMES, config_classes, model_sha256
from .openvino_ir import export_openvino
from .preprocess import (
                       ConfigNotDeployableError,
                       ImageReadError,
                       InputSpec,
                       find_images,
                       make_batch,
                       prepare,
                       read_image,
)
from .translations import CUSTOM_TRANSLATIONS

__all__ = ['CUSTOM_TRANSLATIONS', 'INPUT_NAMES', 'META', 'MIN_OPSET', 'OUTPUT_NAMES', 'ConfigNotDeployableError',
           'DeployableDetector', 'DeployedDetector', 'Detections', 'ExportResult', 'ImageReadError', 'InputSpec',
           'ModelMismatchError', 'NotExportableError', 'OnnxDetector', 'OpenVinoDetector', 'TorchDetector',
           'check_exportable', 'check_standard', 'config_classes', 'count_unmatched', 'export_kernels', 'export_onnx',
           'export_openvino', 'find_images', 'make_batch', 'model_sha256', 'onnx_eval_model', 'open_deployed',
           'paste_masks', 'prepare', 'read_image', 'read_metadata']
