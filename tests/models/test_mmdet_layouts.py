"""mmdet's own DCN Mask R-CNN and Cascade (Mask) R-CNN checkpoints load strictly into dcn_det's bases.

mmdet's zoo models put mmcv's deformable convs in ResNet (``dcn=dict(type='DCN' | 'DCNv2')``); the same model built
from dcn_det's base with DCNResNet and the same ``dcn`` must hold the same state-dict keys, shapes and order, and,
loaded from mmdet's weights, compute the same outputs.
"""
import os.path as osp

import pytest
import torch

from tests._helpers import CONFIG_DIR
from tests._zoo import build_random, inputs, zoo_config

LAYOUTS = [  # mmdet's config, dcn_det's base over the same mmdet model, the zoo's dcn
    ('dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py', 'mask_rcnn_r50_fpn_coco.py', 'DCNv2', 50),
    pytest.param('dcn/mask-rcnn_r101-dconv-c3-c5_fpn_1x_coco.py', 'mask_rcnn_r50_fpn_coco.py', 'DCN', 101,
                 marks=pytest.mark.slow),
    ('dcn/cascade-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py', 'cascade_rcnn_r50_fpn_coco.py', 'DCN', 50),
    ('dcn/cascade-mask-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py', 'cascade_mask_rcnn_r50_fpn_coco.py', 'DCN', 50),
]


@pytest.mark.parametrize('zoo_name, base, dcn, depth', LAYOUTS,
                         ids=lambda v: v.split('/')[1][:-15] if isinstance(v, str) and '/' in v else None)
def test_mmdet_dcn_checkpoint_loads_strictly_and_computes_the_same(zoo_name, base, dcn, depth, tmp_path):
    theirs_cfg = zoo_config(zoo_name)
    assert theirs_cfg.model.backbone.type == 'ResNet' and theirs_cfg.model.backbone.dcn.type == dcn
    theirs = build_random(theirs_cfg).eval()
    path = tmp_path / 'mmdet.pth'
    torch.save({'state_dict': theirs.state_dict()}, path)

    ours_cfg = zoo_config(osp.join(CONFIG_DIR, '_base_', base))
    ours_cfg.model.backbone.update(depth=depth, dcn=dict(type=dcn, deform_groups=1),
                                   stage_with_dcn=(False, True, True, True))
    ours = build_random(ours_cfg, seed=1).eval()
    assert ours.backbone.__class__.__name__ == 'DCNResNet'
    state = torch.load(path, weights_only=True)['state_dict']
    assert list(ours.state_dict()) == list(state)  # key for key, in order
    ours.load_state_dict(state, strict=True)

    data = theirs.data_preprocessor(inputs(), False)
    with torch.no_grad():
        # features -> RPN proposals -> every RoI head's raw outputs
        want, got = _tensors(theirs(**data, mode='tensor')), _tensors(ours(**data, mode='tensor'))
    assert len(got) == len(want) > 0
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def _tensors(outputs) -> list:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for o in outputs for t in _tensors(o)]
