"""The input contract: read from configs, and image preparation identical to mmdet's test pipeline."""
import glob
import os.path as osp

import cv2
import numpy as np
import pytest
from mmcv.transforms import Compose
from mmengine.registry import init_default_scope

from dcn_det.deploy import (
    ConfigNotDeployableError,
    ImageReadError,
    InputSpec,
    find_images,
    make_batch,
    prepare,
    read_image,
)
from tests._helpers import CONFIG_DIR
from tests.deploy._models import make_image, shipped_config

SHIPPED = sorted(osp.basename(p) for p in glob.glob(osp.join(CONFIG_DIR, '*.py')))


def mmdet_pipeline(cfg):
    init_default_scope('mmdet')
    steps = [dict(s) for s in cfg.test_dataloader.dataset.pipeline if s['type'] != 'LoadAnnotations']
    steps[0]['type'] = 'mmdet.LoadImageFromNDArray'
    return Compose(steps)


@pytest.mark.parametrize('keep_ratio', [True, False])
@pytest.mark.parametrize('hw', [(50, 70), (90, 61), (320, 320), (33, 200), (1000, 7)])
def test_prepare_is_mmdets_test_pipeline_bit_for_bit(hw, keep_ratio):
    cfg = shipped_config('shapes_r18_dcnv2.py')
    for step in cfg.test_dataloader.dataset.pipeline:
        if step['type'] == 'Resize':
            step['keep_ratio'] = keep_ratio
            step['scale'] = (320, 240)
    image = make_image(*hw)
    spec = InputSpec.from_config(cfg)
    data = mmdet_pipeline(cfg)(dict(img=image, img_id=0))
    ours = prepare(image, spec)
    assert ours.image.dtype == np.uint8
    np.testing.assert_array_equal(ours.image, data['inputs'].numpy())
    assert ours.image.shape[1:] == data['data_samples'].metainfo['img_shape']
    assert ours.scale_factor == data['data_samples'].metainfo['scale_factor']
    assert spec.resized_size(*hw) == data['data_samples'].metainfo['img_shape']


@pytest.mark.parametrize('name', SHIPPED)
def test_every_shipped_config_has_a_deployable_input(name):
    cfg = shipped_config(name)
    spec = InputSpec.from_config(cfg)
    pre = cfg.model.data_preprocessor
    assert spec.mean == tuple(pre.mean) and spec.std == tuple(pre.std) and spec.bgr_to_rgb == pre.bgr_to_rgb
    assert spec.keep_ratio and spec.pad_size_divisor == pre.pad_size_divisor
    assert InputSpec.from_json(spec.to_json()) == spec
    h, w = spec.default_shape()
    assert h % spec.pad_size_divisor == 0 and h >= max(spec.scale) and w >= max(spec.scale)


def test_a_pipeline_step_that_cannot_be_reproduced_is_named():
    cfg = shipped_config('shapes_r18_plain.py')
    cfg.test_dataloader.dataset.pipeline.insert(2, dict(type='RandomFlip', prob=1.0))
    with pytest.raises(ConfigNotDeployableError, match="'RandomFlip' step, which deployment does not reproduce"):
        InputSpec.from_config(cfg)
    del cfg.test_dataloader.dataset.pipeline[1]  # the Resize
    cfg.test_dataloader.dataset.pipeline[1] = dict(type='PackDetInputs')
    with pytest.raises(ConfigNotDeployableError, match='needs a LoadImageFromFile and a Resize'):
        InputSpec.from_config(cfg)


def test_differences_name_the_fields_and_both_values():
    spec = InputSpec.from_config(shipped_config('shapes_r18_plain.py'))
    other = InputSpec(**{**spec.__dict__, 'scale': (640, 640), 'bgr_to_rgb': False})
    assert spec.differences(other) == [('scale', (320, 320), (640, 640)), ('bgr_to_rgb', True, False)]
    assert not spec.differences(spec)


def test_make_batch_pads_like_mmdet_and_refuses_an_image_larger_than_a_fixed_input():
    spec = InputSpec.from_config(shipped_config('shapes_r18_plain.py'))
    a, b = prepare(make_image(100, 50), spec), prepare(make_image(40, 100), spec)
    feed = make_batch([a.image, b.image], [a.scale_factor, b.scale_factor], spec)
    assert feed['images'].shape == (2, 3, 320, 320) and feed['images'].dtype == np.float32
    np.testing.assert_array_equal(feed['img_shapes'], [[320, 160], [128, 320]])
    assert not feed['images'][0, :, :, 160:].any()  # padding at the right
    np.testing.assert_array_equal(feed['images'][1, :, :128], b.image)
    np.testing.assert_allclose(feed['scale_factors'], [[3.2, 3.2], [3.2, 3.2]])
    with pytest.raises(ValueError, match=r"larger than the model's fixed input 128x128: export with --dynamic"):
        make_batch([a.image], [a.scale_factor], spec, shape=(128, 128))


def test_read_image_reports_missing_and_undecodable_files(tmp_path):
    good = tmp_path / 'good.png'
    cv2.imwrite(str(good), make_image(20, 30))
    assert read_image(str(good)).shape == (20, 30, 3)
    (tmp_path / 'bad.jpg').write_bytes(b'not an image')
    (tmp_path / 'empty.png').write_bytes(b'')
    with pytest.raises(ImageReadError, match='bad.jpg: not an image cv2 can decode'):
        read_image(str(tmp_path / 'bad.jpg'))
    with pytest.raises(ImageReadError, match='empty.png: not an image'):
        read_image(str(tmp_path / 'empty.png'))
    with pytest.raises(ImageReadError, match='nope.png: no such file'):
        read_image(str(tmp_path / 'nope.png'))


def test_find_images_walks_folders_in_order_and_keeps_named_files(tmp_path):
    for rel in ('b/2.png', 'b/1.JPG', 'a.png', 'b/notes.txt', 'b/c/3.webp'):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b'')
    found = find_images([str(tmp_path / 'b'), str(tmp_path / 'missing.png')])
    assert [osp.relpath(f, tmp_path) for f in found] == ['b/1.JPG', 'b/2.png', 'b/c/3.webp', 'missing.png']
