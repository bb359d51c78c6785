"""mmdet's own model-zoo configs (as the installed mmdet ships them), shrunk for CPU tests, with random weights;
and a switch that makes mmcv's deformable kernels raise."""
import contextlib
import copy
import importlib
import os.path as osp

import pytest
import torch
from mmengine.config import Config

# the compiled functions of mmcv's deformable ops (mmcv/ops/*.py load them from mmcv._ext)
MMCV_KERNELS = {
    'deform_conv': ('deform_conv_forward', 'deform_conv_backward_input', 'deform_conv_backward_parameters'),
    'modulated_deform_conv': ('modulated_deform_conv_forward', 'modulated_deform_conv_backward'),
    'deform_roi_pool': ('deform_roi_pool_forward', 'deform_roi_pool_backward'),
    'masked_conv': ('masked_im2col_forward', 'masked_col2im_forward'),
}
WIDTH_DIVISOR = 4  # 256-channel FPNs and heads become 64 (GroupNorm's 32 groups still divide every width)


class MMCVKernelCalled(AssertionError):
    """One of mmcv's deformable kernels ran where dcn_det's should have."""


@contextlib.contextmanager
def mmcv_kernels_forbidden():
    """Inside, each of mmcv's compiled deformable kernels raises :class:`MMCVKernelCalled`."""
    def forbidden(name):
        def call(*args, **kwargs):
            raise MMCVKernelCalled(f"mmcv's {name} was called")
        return call

    with pytest.MonkeyPatch.context() as patch:
        for module, names in MMCV_KERNELS.items():
            ext = importlib.import_module(f'mmcv.ops.{module}').ext_module
            for name in names:
                patch.setattr(ext, name, forbidden(name))
        yield


def zoo_config(name: str, image_size: tuple[int, int] = (96, 128)) -> Config:
    """``mmdet::<name>`` (e.g. ``'dcnv2/faster-rcnn_r50_fpn_mdpool_1x_coco.py'``; an absolute path: that config)
    with nothing to download, every width divided by :data:`WIDTH_DIVISOR` (depth and layer types as shipped), no
    score threshold, and test images resized to ``image_size`` (h, w)."""
    import mmdet

    cfg = Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', name))  # name if absolute
    _drop_pretrained(cfg.model)
    _shrink(cfg.model)
    cfg.model.backbone.base_channels = 64 // WIDTH_DIVISOR
    _set(cfg.model.test_cfg, 'score_thr', 0.0)  # random weights score about 1/80: keep every detection
    for step in cfg.test_dataloader.dataset.pipeline:
        if step['type'] == 'Resize':
            step['scale'], step['keep_ratio'] = image_size[::-1], True
    return cfg


def _drop_pretrained(node) -> None:
    if isinstance(node, dict):
        if 'init_cfg' in node:
            node['init_cfg'] = None
        node.pop('pretrained', None)
        for value in node.values():
            _drop_pretrained(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _drop_pretrained(value)


def _set(node, key, value) -> None:
    if isinstance(node, dict):
        if key in node:
            node[key] = value
        for v in node.values():
            _set(v, key, value)


def _shrink(node) -> None:
    """Divide every channel count (keys ending in 'channels', 16 or more) by WIDTH_DIVISOR, in place."""
    if isinstance(node, (list, tuple)):
        for value in node:
            _shrink(value)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key.endswith('channels') and isinstance(value, int) and value >= 16:
            node[key] = value // WIDTH_DIVISOR
        elif key.endswith('channels') and isinstance(value, (list, tuple)):
            node[key] = [v // WIDTH_DIVISOR for v in value]
        else:
            _shrink(value)


def build_random(cfg: Config, seed: int = 0) -> torch.nn.Module:
    """``cfg.model`` built through mmdet's registry, with random weights everywhere: zero-initialised
    layers (offset and mask predictors) get small random values, so that the deformable layers deform."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    init_default_scope('mmdet')
    torch.manual_seed(seed)
    model = MODELS.build(copy.deepcopy(cfg.model))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.1))
    return model


def inputs(with_mask: bool = False, seed: int = 0) -> dict:
    """Two images of different sizes (96x128, 128x96), one with 3 boxes and one with none."""
    from mmdet.testing import demo_mm_inputs

    torch.manual_seed(seed)
    return demo_mm_inputs(batch_size=2, image_shapes=[(3, 96, 128), (3, 128, 96)], num_items=[3, 0], num_classes=80,
                          with_mask=with_mask)
