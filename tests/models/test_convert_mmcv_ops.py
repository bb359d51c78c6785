"""convert_mmcv_ops on mmdet's own zoo configs: the same predictions as mmcv's kernels, none of mmcv's kernels
called, training, unchanged keys and checkpoints; the layers one by one; the one-line config."""
import copy
import logging
import types

import pytest
import torch
from mmcv.ops import deform_conv2d as mmcv_deform_conv2d
from mmengine.logging import MessageHub
from mmengine.runner.checkpoint import load_state_dict as mmengine_load_state_dict

from dcn_det import convert_mmcv_ops, mmcv_ops_report
from dcn_det.models import convert as convert_module
from tests._zoo import MMCVKernelCalled, build_random, inputs, mmcv_kernels_forbidden, zoo_config

# id: (mmdet config, mmcv classes the model holds, whether mmcv has CPU kernels for all of them)
ZOO = {
    'faster-dconv': ('dcn/faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py', {'DeformConv2dPack'}, True),
    'faster-dpool': ('dcn/faster-rcnn_r50_fpn_dpool_1x_coco.py', {'DeformRoIPoolPack'}, False),
    'mask-dconv': ('dcn/mask-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py', {'DeformConv2dPack'}, True),
    'cascade-dconv': ('dcn/cascade-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py', {'DeformConv2dPack'}, True),
    'cascade-mask-dconv': ('dcn/cascade-mask-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py', {'DeformConv2dPack'}, True),
    'faster-mdconv': ('dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py', {'ModulatedDeformConv2dPack'}, True),
    'faster-mdconv-group4': ('dcnv2/faster-rcnn_r50-mdconv-group4-c3-c5_fpn_1x_coco.py',
                             {'ModulatedDeformConv2dPack'}, True),
    'faster-mdpool': ('dcnv2/faster-rcnn_r50_fpn_mdpool_1x_coco.py', {'ModulatedDeformRoIPoolPack'}, False),
    'mask-mdconv': ('dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py', {'ModulatedDeformConv2dPack'}, True),
    'vfnet': ('vfnet/vfnet_r50-mdconv-c3-c5_fpn_ms-2x_coco.py', {'ModulatedDeformConv2dPack', 'DeformConv2d'}, True),
    'reppoints': ('reppoints/reppoints-moment_r50_fpn-gn_head-gn_1x_coco.py', {'DeformConv2d'}, True),
    'dyhead': ('dyhead/atss_r50_fpn_dyhead_1x_coco.py', {'ModulatedDeformConv2d'}, True),
    'tood': ('tood/tood_r50_fpn_1x_coco.py', {'TOODHead.deform_sampling'}, True),
    'solov2-dcn': ('solov2/solov2-light_r50-dcn_fpn_ms-3x_coco.py', {'ModulatedDeformConv2dPack'}, True),
    'ga-retinanet': ('guided_anchoring/ga-retinanet_r50_fpn_1x_coco.py', {'DeformConv2d', 'MaskedConv2d'}, False),
}


def _predict(model, data) -> list:
    model.eval()
    with torch.no_grad():
        samples = model(**model.data_preprocessor(copy.deepcopy(data), False), mode='predict')
    return [s.pred_instances for s in samples]


@pytest.fixture(scope='module', params=list(ZOO))
def zoo(request):
    """A zoo model before and after conversion: its mmcv predictions (None where mmcv has no CPU kernel),
    converted predictions and one training step run with mmcv's kernels forbidden, the state before."""
    name, _, mmcv_runs = ZOO[request.param]
    cfg = zoo_config(name)
    model = build_random(cfg)
    with_mask = 'mask' in request.param or 'solo' in request.param
    data = inputs(with_mask=with_mask)
    run = types.SimpleNamespace(id=request.param, cfg=cfg, model=model, data=data)
    run.report_before = mmcv_ops_report(model)
    run.state_before = {k: v.clone() for k, v in model.state_dict().items()}
    run.params_before = dict(model.named_parameters())
    run.mmcv_preds = _predict(model, data) if mmcv_runs else None
    run.pool_calls = _record_roi_pools(model)
    assert convert_mmcv_ops(model) is model
    run.report_after = mmcv_ops_report(model)
    with mmcv_kernels_forbidden():
        run.preds = _predict(model, data)
        model.train()
        MessageHub.get_current_instance().update_info('epoch', 0)  # TOOD's head reads it (the Runner sets it)
        losses = model(**model.data_preprocessor(copy.deepcopy(data), True), mode='loss')
        run.loss, _ = model.parse_losses(losses)
        run.loss.backward()
    return run


def _record_roi_pools(model) -> list:
    """Record (layer, input, rois, output) of every deformable RoI pooling call from now on."""
    from mmcv.ops import DeformRoIPool

    calls = []
    for module in model.modules():
        if isinstance(module, DeformRoIPool):
            module.register_forward_hook(lambda m, args, out: calls.append((m, args[0], args[1], out)))
    return calls


def test_every_mmcv_deformable_layer_is_converted(zoo):
    _, classes, _ = ZOO[zoo.id]
    before, after = zoo.report_before, zoo.report_after
    assert set(before.mmcv) == classes and not before.dcn_det and not before.left
    assert not after.mmcv and not after.left and after.dcn_det == before.mmcv


def test_predictions_equal_mmcvs(zoo):
    """Where mmcv has CPU kernels for every layer; elsewhere (deformable RoI pooling, guided anchoring's masked
    conv) mmcv cannot predict on a CPU at all, and the converted model does."""
    if zoo.mmcv_preds is None:
        assert all(len(p.scores) > 0 for p in zoo.preds)
        return
    from tests.deploy._models import assert_same_detections

    for got, want in zip(zoo.preds, zoo.mmcv_preds, strict=True):
        assert len(want.scores) > 0
        if 'bboxes' in want and want.bboxes.numel():
            assert_same_detections(*[(p.bboxes.numpy(), p.scores.numpy(), p.labels.numpy()) for p in (got, want)],
                                   score_tol=1e-4, box_tol=1e-2)
        else:  # SOLOv2: masks with their scores, in the same order
            torch.testing.assert_close(got.scores, want.scores, atol=1e-4, rtol=0)
            assert torch.equal(got.labels, want.labels)
        if 'masks' in want:
            assert (got.masks != want.masks).float().mean() < 1e-3


def test_deformable_roi_pooling_matches_the_float64_reference(zoo):
    if not zoo.pool_calls:
        pytest.skip('no deformable RoI pooling in this model')
    from tests.ops._reference import roi_reference

    checked = 0
    for layer, input, rois, out in zoo.pool_calls:
        if len(rois) == 0:
            continue
        rois, out = rois[:4].double(), out[:4]
        fcs = copy.deepcopy(layer).double()
        args = (layer.output_size, layer.spatial_scale, layer.sampling_ratio, layer.gamma)
        plain = roi_reference(input.double(), rois, None, *args).flatten(1)
        offset = fcs.offset_fc(plain).view(-1, 2, *layer.output_size)
        want = roi_reference(input.double(), rois, offset, *args)
        if hasattr(fcs, 'mask_fc'):
            want = want * fcs.mask_fc(plain).view(-1, 1, *layer.output_size)
        assert offset.abs().max() > 0.05  # the offsets deform
        torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
        checked += 1
        if checked == 2:
            break
    assert checked


def test_training_runs_on_dcn_det_and_reaches_every_deformable_layer(zoo):
    """Every converted layer's parameters (weights, offset and mask predictors; TOOD: the offset branch) get
    a gradient from the loss; of the per-level RoI pooling layers, those of the levels that received RoIs
    (with small images: the finest)."""
    from mmdet.models.dense_heads import TOODHead

    assert torch.isfinite(zoo.loss) and zoo.loss > 0
    pools, layers = [], 0
    for name, module in zoo.model.named_modules():
        if not type(module).__module__.startswith('dcn_det'):
            continue
        params = module.reg_offset_module if isinstance(module, TOODHead) else module
        reached = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in params.named_parameters()}
        if 'roi_layers' in name:
            pools.append(all(reached.values()))
        elif reached:
            assert all(reached.values()), f'{name}: no gradient for {[n for n, r in reached.items() if not r]}'
            layers += 1
    assert layers or any(pools)


def test_keys_and_parameter_tensors_are_unchanged(zoo):
    assert list(zoo.model.state_dict()) == list(zoo.state_before)
    params = dict(zoo.model.named_parameters())
    assert params.keys() == zoo.params_before.keys()
    assert all(params[n] is p for n, p in zoo.params_before.items())


def test_a_checkpoint_saved_before_conversion_loads_strictly_after(zoo, tmp_path):
    path = tmp_path / 'before.pth'
    torch.save({'state_dict': zoo.state_before}, path)
    state = torch.load(path, weights_only=True)['state_dict']
    result = zoo.model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    fresh = build_random(zoo.cfg, seed=1)  # and a converted model's checkpoint loads into mmcv's layers
    fresh.load_state_dict(zoo.model.state_dict(), strict=True)


def test_converting_twice_changes_nothing(zoo, monkeypatch):
    lines = []
    monkeypatch.setattr(convert_module, 'print_log', lambda msg, **kw: lines.append(msg))
    convert_mmcv_ops(zoo.model)
    assert mmcv_ops_report(zoo.model) == zoo.report_after
    assert lines == [f"convert_mmcv_ops: converted nothing to dcn_det's kernels "
                     f"({sum(zoo.report_after.dcn_det.values())} in all)"
                     + ("; 6 DyHead spatial_conv_high layers read the finer level's offsets as mmcv does"
                        if zoo.id == 'dyhead' else '')]


# ------------------------------------------------------------------------------------------------
# the layers one by one


def _pair(mmcv_cls, *args, **kwargs):
    torch.manual_seed(0)
    layer = mmcv_cls(*args, **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return layer, convert_mmcv_ops(copy.deepcopy(layer))


def test_the_forbidding_switch_does_stop_mmcvs_kernels():
    from mmcv.ops import ModulatedDeformConv2dPack

    layer = ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    with mmcv_kernels_forbidden(), pytest.raises(MMCVKernelCalled, match='modulated_deform_conv_forward'):
        layer(torch.randn(1, 4, 5, 5))


@pytest.mark.parametrize('cls_name', ['DeformConv2d', 'ModulatedDeformConv2d'])
def test_conv_layers_with_caller_offsets_equal_mmcvs_including_inputs_smaller_than_the_kernel(cls_name):
    import mmcv.ops

    mmcv_layer, ours = _pair(getattr(mmcv.ops, cls_name), 6, 4, 3, padding=1, deform_groups=2)
    assert isinstance(ours, getattr(mmcv.ops, cls_name)) and type(ours).__module__ == 'dcn_det.models.layers'
    for size in ((7, 5), (2, 1), (1, 1)):  # mmcv pads an input smaller than the kernel and crops the output
        x = torch.randn(2, 6, *size)
        args = [x, torch.randn(2, 36, *size)] + ([torch.rand(2, 18, *size)] if cls_name.startswith('Mod') else [])
        want = mmcv_layer(*args)
        with mmcv_kernels_forbidden():
            got = ours(*args)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dyhead_reads_a_finer_levels_offsets_as_mmcv_and_nothing_else_does():
    """mmdet's DyHeadBlock passes the finer level's offset and mask (2x the size) to spatial_conv_high."""
    from mmcv.ops import ModulatedDeformConv2d
    from mmdet.models.necks.dyhead import DyHeadBlock

    block = DyHeadBlock(16, 16)
    mmcv_conv = copy.deepcopy(block.spatial_conv_high.conv)
    convert_mmcv_ops(block)
    ours = block.spatial_conv_high.conv
    assert ours.reads_offsets_as_mmcv_buffer and not block.spatial_conv_mid.conv.reads_offsets_as_mmcv_buffer
    x = torch.randn(2, 16, 5, 6)  # the coarse level
    offset_and_mask = torch.randn(2, 27, 10, 12)  # predicted on the finer level
    offset, mask = offset_and_mask[:, :18], offset_and_mask[:, 18:].sigmoid()  # a strided slice, as DyHead's
    torch.testing.assert_close(ours(x, offset, mask), mmcv_conv(x, offset, mask), atol=1e-5, rtol=1e-5)
    other = convert_mmcv_ops(torch.nn.ModuleDict(dict(head=ModulatedDeformConv2d(16, 16, 3, padding=1))))
    with pytest.raises(ValueError, match=r'^head: offset must have .* spatial size \(H_out, W_out\) = \(5, 6\)'):
        other.head(x, offset, mask)  # outside DyHead: the op's error, naming the layer
    with pytest.raises(ValueError, match=r'offset must have'):  # too small a buffer: the error, flag or not
        ours(x, offset[:, :, :2, :2], mask[:, :, :2, :2])


def test_the_public_op_refuses_mismatched_offsets():
    from dcn_det.ops import deform_conv2d

    with pytest.raises(ValueError, match=r'offset must .*18 channels .* shape \(1, 18, 4, 4\), got \(1, 18, 8, 8\)'):
        deform_conv2d(torch.randn(1, 2, 4, 4), torch.zeros(1, 18, 8, 8), torch.randn(2, 2, 3, 3), padding=1)


def test_tood_samples_through_dcn_det_and_equals_mmcvs_function():
    from mmcv.ops import deform_conv2d
    from mmdet.models.dense_heads import TOODHead

    head = TOODHead(num_classes=3, in_channels=32, feat_channels=32, stacked_convs=2,
                    anchor_generator=dict(type='AnchorGenerator', ratios=[1.0], octave_base_scale=8,
                                          scales_per_octave=1, strides=[8]))
    feat, offset = torch.randn(2, 4, 6, 7), torch.randn(2, 8, 6, 7) * 2
    want = deform_conv2d(feat, offset, feat.new_ones(4, 1, 1, 1), 1, 0, 1, 4, 4)  # as mmdet's tood_head.py
    convert_mmcv_ops(head)
    assert isinstance(head, TOODHead) and mmcv_ops_report(head).dcn_det == {'TOODHead.deform_sampling': 1}
    with mmcv_kernels_forbidden():
        torch.testing.assert_close(head.deform_sampling(feat, offset), want, atol=1e-5, rtol=1e-5)
    assert type(TOODHead.deform_sampling).__name__ == 'function' and TOODHead.__module__.startswith('mmdet')


@pytest.mark.parametrize('modulated', [False, True])
def test_roi_pool_packs_run_on_cpu_where_mmcv_cannot(modulated):
    from mmcv.ops import DeformRoIPoolPack, ModulatedDeformRoIPoolPack

    from tests.ops._reference import roi_reference

    cls = ModulatedDeformRoIPoolPack if modulated else DeformRoIPoolPack
    mmcv_layer, ours = _pair(cls, (2, 3), 3, 8, spatial_scale=0.5, sampling_ratio=2)
    x, rois = torch.randn(2, 3, 9, 11), torch.tensor([[0, 1.0, 2.0, 15.0, 12.0], [1, 4.0, 0.0, 20.0, 17.0]])
    with pytest.raises(RuntimeError, match='not found|not implemented|cpu'):
        mmcv_layer(x, rois)
    out = ours(x, rois)
    plain = roi_reference(x.double(), rois, None, (2, 3), 0.5, 2, 0.1).flatten(1)
    fcs = copy.deepcopy(ours).double()
    want = roi_reference(x.double(), rois, fcs.offset_fc(plain).view(-1, 2, 2, 3), (2, 3), 0.5, 2, 0.1)
    if modulated:
        want = want * fcs.mask_fc(plain).view(-1, 1, 2, 3)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='input has 4 channels but the layer was built with output_channels=3'):
        ours(torch.randn(2, 4, 9, 11), rois)


def test_masked_conv_computes_where_the_mask_is_set_and_writes_zero_elsewhere():
    from mmcv.ops import MaskedConv2d

    mmcv_layer, ours = _pair(MaskedConv2d, 3, 5, 3, padding=1)
    x, mask = torch.randn(1, 3, 6, 7), torch.rand(1, 6, 7) > 0.5
    dense = torch.nn.functional.conv2d(x, mmcv_layer.weight, mmcv_layer.bias, padding=1)
    with mmcv_kernels_forbidden():
        out = ours(x, mask)
    torch.testing.assert_close(out[0][:, mask[0]], dense[0][:, mask[0]])
    assert not out[0][:, ~mask[0]].any()
    torch.testing.assert_close(ours(x), dense)  # no mask: a plain conv, as mmcv's


def test_subclasses_with_their_own_forward_and_uncovered_ops_are_left_and_named(monkeypatch):
    from mmcv.ops import DeformConv2dPack, ModulatedDeformConv2dPack, MultiScaleDeformableAttention

    class OwnForward(DeformConv2dPack):
        def forward(self, x):
            return super().forward(x) * 2

    class InheritsForward(ModulatedDeformConv2dPack):
        pass

    class CallsMMCVsFunction(torch.nn.Module):
        def forward(self, x, offset):
            return mmcv_deform_conv2d(x, offset, x.new_ones(4, 1, 1, 1), 1, 0, 1, 4, 4)

    model = torch.nn.ModuleDict(dict(own=OwnForward(4, 4, 3, padding=1), inherits=InheritsForward(4, 4, 3, padding=1),
                                     plain=DeformConv2dPack(4, 4, 3, padding=1),
                                     attention=MultiScaleDeformableAttention(embed_dims=32, num_levels=1),
                                     function=CallsMMCVsFunction()))
    lines = []
    monkeypatch.setattr(convert_module, 'print_log', lambda msg, **kw: lines.append((msg, kw.get('level'))))
    convert_mmcv_ops(model)
    report = mmcv_ops_report(model)
    assert type(model.own) is OwnForward and isinstance(model.inherits, InheritsForward)
    assert type(model.inherits).__module__ == 'dcn_det.models.convert'
    assert report.dcn_det == {'ModulatedDeformConv2dPack': 1, 'DeformConv2dPack': 1}
    assert report.left == {'OwnForward': 1, 'MultiScaleDeformableAttention': 1, 'CallsMMCVsFunction': 1}
    (line, level), = lines
    assert level == logging.WARNING and '\n' not in line
    assert line.endswith('LEFT on mmcv: 1 CallsMMCVsFunction (calls mmcv.ops.deform_conv2d directly); '
                         '1 MultiScaleDeformableAttention (no dcn_det kernel for mmcv.ops.multi_scale_deform_attn); '
                         '1 OwnForward (a subclass of DeformConv2dPack with its own forward)')
    x = torch.randn(1, 4, 5, 5)
    with mmcv_kernels_forbidden():
        model.inherits(x)
        with pytest.raises(MMCVKernelCalled):
            model.own(x)


def test_offset_lr_mult_still_finds_the_converted_layers_and_an_earlier_optimizer_trains_them():
    from mmcv.ops import ModulatedDeformConv2dPack
    from mmengine.optim import DefaultOptimWrapperConstructor

    model = torch.nn.Sequential(ModulatedDeformConv2dPack(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 1))
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    convert_mmcv_ops(model)
    wrapper = DefaultOptimWrapperConstructor(dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1)),
                                             dict(dcn_offset_lr_mult=0.1))(model)
    lrs = {id(p): g['lr'] for g in wrapper.optimizer.param_groups for p in g['params']}
    assert lrs[id(model[0].conv_offset.weight)] == pytest.approx(0.01) and lrs[id(model[0].weight)] == 0.1
    before = model[0].conv_offset.weight.detach().clone()
    with mmcv_kernels_forbidden():
        model(torch.randn(1, 4, 6, 6)).square().sum().backward()
    early.step()
    assert not torch.equal(model[0].conv_offset.weight, before)


def test_a_checkpoint_of_another_model_gives_mmengines_message_as_without_conversion():
    from mmcv.ops import ModulatedDeformConv2dPack

    def message(model):
        state = {k: v for k, v in model.state_dict().items() if k != 'conv_offset.bias'}
        state['extra'] = torch.zeros(1)
        with pytest.raises(RuntimeError) as error:
            mmengine_load_state_dict(model, state, strict=True)
        return str(error.value)

    plain = ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    want = message(plain)
    assert 'missing keys in source state_dict: conv_offset.bias' in want and 'unexpected key' in want
    assert message(convert_mmcv_ops(plain)) == want


def test_a_nan_offset_names_the_layer():
    from mmcv.ops import DeformConv2d

    from dcn_det.ops import NonFiniteError

    model = convert_mmcv_ops(torch.nn.ModuleDict(dict(head=DeformConv2d(2, 2, 3, padding=1))))
    offset = torch.zeros(1, 18, 4, 4)
    offset[0, 3, 1, 1] = float('nan')
    with pytest.raises(NonFiniteError, match='^head: offset has 1 NaN'):
        model.head(torch.randn(1, 2, 4, 4), offset)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_on_cuda_converted_layers_dispatch_as_auto_does():
    from mmcv.ops import ModulatedDeformConv2dPack, ModulatedDeformRoIPoolPack

    from dcn_det.ops import deform_conv2d
    from dcn_det.ops.deform_conv import resolve_backend

    conv, ours = (m.cuda() for m in _pair(ModulatedDeformConv2dPack, 4, 4, 3, padding=1))
    x = torch.randn(2, 4, 9, 7, device='cuda')
    o1, o2, m = ours.conv_offset(x).chunk(3, 1)
    want = deform_conv2d(x, torch.cat((o1, o2), 1), ours.weight, ours.bias, 1, 1, 1, m.sigmoid(),
                         backend=resolve_backend('auto', x.device))
    torch.testing.assert_close(ours(x), want)
    torch.testing.assert_close(ours(x), conv(x), atol=1e-4, rtol=1e-4)
    pool = convert_mmcv_ops(ModulatedDeformRoIPoolPack(7, 4, 16).cuda())
    out = pool(x, torch.tensor([[0, 1.0, 1.0, 6.0, 8.0]], device='cuda'))
    assert out.is_cuda and out.shape == (1, 4, 7, 7)

