"""The demo dataset (dcn_det.data.synthetic): deterministic, valid COCO, geometrically varied, careful with
existing data."""
import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from dcn_det.data import synthetic
from dcn_det.data.synthetic import DEFAULT_CLASSES, generate

REPO = Path(__file__).resolve().parents[2]
# A handful of small images; sizes 8-80 px leave room for a 4x scale range after occlusion.
TINY = dict(num_train=6, num_val=2, image_size=160, min_size=8, max_size=80)
OTHER_CLASSES = ('heart', 'crescent', 'arrow', 'chevron')


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def _load(root: Path, split: str) -> COCO:
    return COCO(str(root / 'annotations' / f'instances_{split}.json'))


def _iou(a: list[int], b: list[int]) -> float:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp('shapes') / 'data'
    return root, generate(root, seed=0, **TINY)


def test_same_seed_gives_byte_identical_files(dataset, tmp_path):
    root, _ = dataset
    generate(tmp_path / 'again', seed=0, **TINY)
    first, again = _files(root), _files(tmp_path / 'again')
    assert len(first) == TINY['num_train'] + TINY['num_val'] + 3  # 2 annotation files, preview
    assert first == again


def test_another_seed_gives_other_images_and_boxes(dataset, tmp_path):
    root, _ = dataset
    generate(tmp_path / 'other', seed=1, **TINY)
    first, other = _files(root), _files(tmp_path / 'other')
    assert first.keys() == other.keys()
    assert first['annotations/instances_train.json'] != other['annotations/instances_train.json']
    assert all(first[f'train/{i:06d}.png'] != other[f'train/{i:06d}.png'] for i in (1, 2))


@pytest.mark.parametrize('split', ['train', 'val'])
def test_annotations_are_valid_coco(dataset, split):
    root, _ = dataset
    coco = _load(root, split)
    size = TINY['image_size']
    assert [c['id'] for c in coco.dataset['categories']] == list(range(1, len(DEFAULT_CLASSES) + 1))
    assert [c['name'] for c in coco.dataset['categories']] == list(DEFAULT_CLASSES)
    images, anns = coco.dataset['images'], coco.dataset['annotations']
    assert len(images) == TINY[f'num_{split}'] and len(anns) >= len(images)
    assert len({i['id'] for i in images}) == len(images)
    assert len({a['id'] for a in anns}) == len(anns)
    for image in images:
        with Image.open(root / split / image['file_name']) as im:
            assert im.size == (image['width'], image['height']) == (size, size)
            assert im.mode == 'RGB'
    for a in anns:
        x, y, w, h = a['bbox']
        assert 0 <= x and 0 <= y and x + w <= size and y + h <= size, a['bbox']
        assert w > 0 and h > 0 and 0 < a['area'] <= w * h
        assert a['category_id'] in coco.cats and a['image_id'] in coco.imgs and a['iscrowd'] == 0
        assert a['visibility'] >= 0.3  # the occlusion rule: a less visible object is never drawn
        # the mask is of the visible pixels: its pixel count is the area and its extent the box
        assert a['segmentation']['size'] == [size, size]
        ys, xs = np.nonzero(coco.annToMask(a))
        assert xs.size == a['area'] and [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [x, y, x + w, y + h]


def test_dataset_has_the_geometric_variation_deformable_convs_are_for(dataset):
    root, summary = dataset
    per_split = [_load(root, split).dataset['annotations'] for split in ('train', 'val')]
    anns = per_split[0] + per_split[1]
    boxes = np.array([a['bbox'] for a in anns], float)
    side = np.sqrt(boxes[:, 2] * boxes[:, 3])
    aspect = boxes[:, 2] / boxes[:, 3]
    assert side.max() / side.min() >= 4
    assert aspect.max() / aspect.min() >= 2
    assert {a['category_id'] for a in anns} == set(range(1, len(DEFAULT_CLASSES) + 1))
    assert any(a['visibility'] < 0.9 for a in anns)  # occluded or cut by the border
    overlaps = sum(_iou(a['bbox'], b['bbox']) > 0
                   for split in per_split for a, b in itertools.combinations(split, 2)
                   if a['image_id'] == b['image_id'])
    assert overlaps >= 2 and overlaps == summary['overlapping_box_pairs']
    assert summary['scale_ratio'] == pytest.approx(side.max() / side.min(), abs=0.06)
    assert sum(summary['objects'].values()) == sum(summary['objects_per_class'].values()) > 0


def test_other_class_names(tmp_path):
    summary = generate(tmp_path / 'other', classes=OTHER_CLASSES, **TINY)
    coco = _load(tmp_path / 'other', 'train')
    assert [(c['id'], c['name']) for c in coco.dataset['categories']] == list(enumerate(OTHER_CLASSES, 1))
    assert {a['category_id'] for a in coco.dataset['annotations']} <= set(range(1, len(OTHER_CLASSES) + 1))
    assert list(summary['objects_per_class']) == list(OTHER_CLASSES)


def test_refuses_to_overwrite_a_non_empty_dir_and_leaves_it_alone(tmp_path):
    out = tmp_path / 'data'
    out.mkdir()
    (out / 'keep.txt').write_text('precious')
    with pytest.raises(FileExistsError, match=re.escape(str(out)) + '.*delete it or choose another'):
        generate(out, **TINY)
    assert _files(out) == {'keep.txt': b'precious'}
    assert [p.name for p in tmp_path.iterdir()] == ['data']  # no temporary dir left beside it

    generate(out, overwrite=True, **TINY)
    assert not (out / 'keep.txt').exists() and (out / 'annotations' / 'instances_val.json').is_file()
    assert [p.name for p in tmp_path.iterdir()] == ['data']


def test_writes_into_an_existing_empty_dir(tmp_path):
    (tmp_path / 'data').mkdir()
    generate(tmp_path / 'data', **TINY)
    assert (tmp_path / 'data' / 'annotations' / 'instances_train.json').is_file()


def test_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    render, calls = synthetic._render_image, []

    def render_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render(*args, **kwargs)

    monkeypatch.setattr(synthetic, '_render_image', render_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / 'data', **TINY)
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_unknown_class_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown class 'blob': choose from ellipse, .*heart"):
        generate(tmp_path / 'data', classes=('ellipse', 'blob'), **TINY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('bad, match', [
    (dict(max_size=100), r'max_size=100 does not fit image_size=160.*lower max_size or raise image_size'),
    (dict(min_size=4), r'need 8 <= min_size <= max_size'),
    (dict(num_val=0), r'num_train and num_val must be at least 1'),
    (dict(classes='ellipse'), r'classes must be a non-empty sequence'),
    (dict(classes=('ring', 'ring')), r'must not repeat'),
])
def test_bad_arguments_are_clear_errors(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        generate(tmp_path / 'data', **{**TINY, **bad})
    assert list(tmp_path.iterdir()) == []


def test_ring_masks_leave_the_hole_out(tmp_path):
    generate(tmp_path / 'rings', classes=('ring',), seed=0, **TINY)
    coco = _load(tmp_path / 'rings', 'train')
    rings = [a for a in coco.dataset['annotations'] if a['visibility'] == 1]
    assert rings
    for a in rings:  # a whole ring: the box's centre pixel is the hole's, not the ring's
        x, y, w, h = a['bbox']
        assert coco.annToMask(a)[y + h // 2, x + w // 2] == 0


def test_rle_encode_round_trips_through_pycocotools():
    from pycocotools import mask as mask_utils

    from dcn_det.data.synthetic import rle_encode

    rng = np.random.default_rng(0)
    for m in (rng.uniform(size=(7, 5)) > 0.5, np.ones((3, 4), bool), np.zeros((4, 3), bool)):
        rle = rle_encode(m)
        decoded = mask_utils.decode(mask_utils.frPyObjects(rle, *rle['size']))
        assert (decoded.astype(bool) == m).all()
