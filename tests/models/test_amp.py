"""Mixed precision on a CPU (dcn_det.models.amp): bfloat16 autocast over a detector, float32 where needed."""
import copy
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from dcn_det.models import CPUAmpOptimWrapper, keep_float32
from tests._helpers import CONFIG_DIR, shrink_detector


@pytest.fixture
def detector():
    from mmdet.registry import MODELS

    cfg = shrink_detector(Config.fromfile(osp.join(CONFIG_DIR, 'faster_rcnn_dcnv2.py')))
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setenv('DCN_DET_CPU_BF16', '1')


def _predict(model, inputs):
    model.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        return model(**model.data_preprocessor(inputs, False), mode='predict')


def test_bf16_autocast_needs_float32_boundaries(detector, tiny_inputs, native_bf16):
    """Without keep_float32 mmcv's CPU NMS dies on bfloat16 proposals; with it, prediction runs and gives
    float32 boxes close to the float32 model's."""
    with pytest.raises(RuntimeError, match='Float|BFloat16'):
        _predict(detector, tiny_inputs)
    assert keep_float32(detector) > 0
    results = _predict(detector, tiny_inputs)
    with torch.no_grad():
        expected = detector(**detector.data_preprocessor(tiny_inputs, False), mode='predict')
    for r, e in zip(results, expected, strict=True):
        assert r.pred_instances.bboxes.dtype == torch.float32
        assert len(r.pred_instances) > 0 and len(e.pred_instances) > 0


def test_bf16_loss_is_float32_and_reaches_every_parameter(detector, tiny_inputs, native_bf16):
    keep_float32(detector)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = detector(**detector.data_preprocessor(tiny_inputs, True), mode='loss')
    total, _ = detector.parse_losses(losses)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(v.dtype == torch.float32 for k, v in losses.items() if 'loss' in k and torch.is_tensor(v))
    total.backward()
    offset_grads = [p.grad for n, p in detector.named_parameters() if 'conv_offset' in n]
    assert offset_grads and all(g is not None and g.dtype == torch.float32 for g in offset_grads)


def test_deformable_roi_pooling_pools_float32_and_predicts_offsets_in_bf16(detector, tiny_inputs, native_bf16):
    """The deformable RoI extractor gets float32 features (it pools in float32) but stays under autocast, so
    its offset predictor's fc layers run in bfloat16, unlike mmcv's RoIAlign extractors, run wholly in float32."""
    keep_float32(detector)
    extractor = detector.roi_head.bbox_roi_extractor
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)
        return hook

    fcs = [m for m in extractor.modules() if isinstance(m, torch.nn.Linear)]
    assert fcs
    hooks = [fc.register_forward_hook(record('fc')) for fc in fcs]
    hooks.append(extractor.register_forward_hook(record('extractor')))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        detector(**detector.data_preprocessor(tiny_inputs, True), mode='loss')
    for hook in hooks:
        hook.remove()
    assert seen == {'fc': torch.bfloat16, 'extractor': torch.float32}


def test_keep_float32_is_idempotent_and_survives_a_deep_copy(detector):
    assert keep_float32(detector) > 0
    assert keep_float32(detector) == 0
    twin = copy.deepcopy(detector)
    assert keep_float32(twin) == 0
    head = twin.rpn_head
    assert head.predict_by_feat.__self__ is head  # bound to the copy, not to the original


def test_optim_wrapper_runs_the_step_under_bf16_autocast(detector, native_bf16):
    wrapper = CPUAmpOptimWrapper(optimizer=torch.optim.SGD(detector.parameters(), lr=0.01))
    with wrapper.optim_context(detector):
        assert torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16
    assert not torch.is_autocast_enabled('cpu')
    assert keep_float32(detector) == 0  # the context installed the float32 boundaries


def test_optim_wrapper_refuses_a_cpu_without_native_bf16(detector, monkeypatch):
    monkeypatch.setenv('DCN_DET_CPU_BF16', '0')
    with pytest.raises(RuntimeError, match='no native bfloat16 .* run without --amp'):
        CPUAmpOptimWrapper(optimizer=torch.optim.SGD(detector.parameters(), lr=0.01))


def test_optim_wrapper_is_in_mmdets_registry():
    from mmdet.registry import OPTIM_WRAPPERS

    assert OPTIM_WRAPPERS.get('CPUAmpOptimWrapper') is CPUAmpOptimWrapper
