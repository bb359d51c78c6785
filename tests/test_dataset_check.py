"""Rule: a missing or corrupt annotation file, or a missing image folder, is named in one line before anything is
built (dcn_det.dataset_check), for the dataloaders and evaluators the run uses."""
import json

import pytest
from mmengine.config import Config

from dcn_det.dataset_check import DatasetFileError, check_dataset_files


@pytest.fixture
def root(tmp_path):
    (tmp_path / 'annotations').mkdir()
    for split in ('train', 'val'):
        (tmp_path / split).mkdir()
        (tmp_path / 'annotations' / f'instances_{split}.json').write_text(json.dumps({'images': []}))
    return tmp_path


def _dataset(root, split='train', **kwargs):
    return dict(type='CocoDataset', data_root=str(root), ann_file=f'annotations/instances_{split}.json',
                data_prefix=dict(img=f'{split}/'), **kwargs)


def _cfg(root, **changes):
    cfg = dict(
        train_dataloader=dict(dataset=_dataset(root)),
        val_dataloader=dict(dataset=_dataset(root, 'val')), val_cfg=dict(type='ValLoop'),
        val_evaluator=dict(type='CocoMetric', ann_file=str(root / 'annotations' / 'instances_val.json')),
        test_dataloader=dict(dataset=_dataset(root, 'val')),
        test_evaluator=dict(type='CocoMetric', ann_file=str(root / 'annotations' / 'instances_val.json')))
    cfg.update(changes)
    return Config(cfg)


def test_complete_data_passes(root):
    check_dataset_files(_cfg(root), 'train')
    check_dataset_files(_cfg(root), 'test')


def test_missing_annotation_file_names_path_and_key(root):
    (root / 'annotations' / 'instances_train.json').unlink()
    with pytest.raises(DatasetFileError) as e:
        check_dataset_files(_cfg(root), 'train')
    message = str(e.value)
    assert message.startswith('train_dataloader.dataset.ann_file: annotation file ')
    assert str(root / 'annotations' / 'instances_train.json') in message and 'does not exist' in message
    assert '--cfg-options train_dataloader.dataset.data_root=DIR' in message and '\n' not in message
    check_dataset_files(_cfg(root), 'test')  # the test run does not read it


def test_missing_image_folder(root):
    (root / 'val').rmdir()
    with pytest.raises(DatasetFileError, match=r"test_dataloader\.dataset\.data_prefix\.img: folder '.*/val/' does "
                                               r'not exist'):
        check_dataset_files(_cfg(root), 'test')
    with pytest.raises(DatasetFileError, match=r'val_dataloader\.dataset\.data_prefix\.img'):
        check_dataset_files(_cfg(root), 'train')  # training validates too


@pytest.mark.parametrize('content', [b'{"images": [{"id": 1}, {"id"', b'\xff\xfe\x00garbage', b''],
                         ids=['truncated', 'not-text', 'empty'])
def test_corrupt_json_is_named(root, content):
    (root / 'annotations' / 'instances_val.json').write_bytes(content)
    with pytest.raises(DatasetFileError) as e:
        check_dataset_files(_cfg(root), 'test')
    assert 'instances_val.json' in str(e.value) and 'is not valid JSON' in str(e.value)
    assert 'regenerate or download it again' in str(e.value) and '\n' not in str(e.value)


def test_evaluator_ann_file_is_checked_as_written(root):
    cfg = _cfg(root, test_evaluator=dict(type='CocoMetric', ann_file='annotations/instances_val.json'))
    with pytest.raises(DatasetFileError, match=r"test_evaluator\.ann_file: annotation file 'annotations/"):
        check_dataset_files(cfg, 'test')  # CocoMetric does not prefix data_root
    cfg = _cfg(root, test_evaluator=[dict(type='CocoMetric', ann_file=None),
                                     dict(type='CocoMetric', ann_file=str(root / 'nope.json'))])
    with pytest.raises(DatasetFileError, match=r'test_evaluator\.1\.ann_file'):
        check_dataset_files(cfg, 'test')


def test_val_is_checked_only_with_a_complete_val_loop(root):
    (root / 'annotations' / 'instances_val.json').unlink()
    check_dataset_files(_cfg(root, val_cfg=None), 'train')
    with pytest.raises(DatasetFileError, match='val_dataloader'):
        check_dataset_files(_cfg(root), 'train')


def test_wrapped_datasets_are_looked_into(root):
    (root / 'annotations' / 'instances_val.json').unlink()
    repeat = dict(type='RepeatDataset', times=2, dataset=_dataset(root, 'val'))
    with pytest.raises(DatasetFileError, match=r'^train_dataloader\.dataset\.dataset\.ann_file'):
        check_dataset_files(_cfg(root, val_cfg=None, train_dataloader=dict(dataset=repeat)), 'train')
    concat = dict(type='ConcatDataset', datasets=[_dataset(root), _dataset(root, 'val')])
    with pytest.raises(DatasetFileError, match=r'^train_dataloader\.dataset\.datasets\.1\.ann_file'):
        check_dataset_files(_cfg(root, val_cfg=None, train_dataloader=dict(dataset=concat)), 'train')


def test_paths_resolve_as_mmengine_resolves_them(root, monkeypatch):
    # an absolute ann_file ignores data_root; with no data_root, paths are relative to the working dir
    absolute = dict(_dataset('/nonexistent'), ann_file=str(root / 'annotations' / 'instances_train.json'),
                    data_prefix=dict(img=str(root / 'train')))
    check_dataset_files(_cfg(root, val_cfg=None, train_dataloader=dict(dataset=absolute)), 'train')
    monkeypatch.chdir(root)
    relative = dict(_dataset(root), data_root=None)
    check_dataset_files(_cfg(root, val_cfg=None, train_dataloader=dict(dataset=relative)), 'train')
    remote = dict(_dataset('s3://bucket/coco'))  # left to the file backend
    check_dataset_files(_cfg(root, val_cfg=None, train_dataloader=dict(dataset=remote)), 'train')


def _write_coco(path, segmentations):
    """A COCO file of one 20x20 image, one 10x10 box per entry of ``segmentations`` (None: no such key)."""
    anns = [dict(id=i + 1, image_id=1, category_id=1, bbox=[2, 2, 10, 10], area=100, iscrowd=0,
                 **({} if seg is None else {'segmentation': seg})) for i, seg in enumerate(segmentations)]
    path.write_text(json.dumps({'images': [dict(id=1, file_name='a.png', width=20, height=20)],
                                'annotations': anns, 'categories': [dict(id=1, name='thing')]}))


@pytest.mark.parametrize('how', ['mask head', 'pipeline', 'segm metric'])
def test_a_mask_config_on_a_dataset_without_segmentation_is_refused(root, how):
    square = [[2, 2, 12, 2, 12, 12, 2, 12]]
    _write_coco(root / 'annotations' / 'instances_train.json', [None, None])
    _write_coco(root / 'annotations' / 'instances_val.json', [square])
    changes = {'mask head': dict(model=dict(roi_head=dict(mask_head=dict(type='FCNMaskHead')))),
               'pipeline': dict(train_dataloader=dict(dataset=_dataset(root, pipeline=[
                   dict(type='LoadAnnotations', with_bbox=True, with_mask=True)])))}.get(how)
    if how == 'segm metric':  # the evaluator reads the train file here: it has no masks
        changes = dict(val_evaluator=dict(type='CocoMetric', metric=['bbox', 'segm'],
                                          ann_file=str(root / 'annotations' / 'instances_train.json')))
    with pytest.raises(DatasetFileError) as e:
        check_dataset_files(_cfg(root, **changes), 'train')
    message = str(e.value)
    assert "instances_train.json' has no 'segmentation' in any of its 2 annotations" in message
    assert '\n' not in message
    check_dataset_files(_cfg(root), 'train')  # a box-only config trains on it


def test_empty_masks_are_skipped_with_a_count(tmp_path):
    from mmdet.datasets.transforms import LoadAnnotations
    from mmengine.logging import MMLogger

    import dcn_det  # noqa: F401  (registers CocoMaskDataset)
    from dcn_det.engine import CocoMaskDataset

    good = [[2, 2, 12, 2, 12, 12, 2, 12]]
    empty = [[], [[2, 2, 7, 7, 12, 12]], [[2, 2, 12, 2]], {'counts': [400], 'size': [20, 20]}]  # no pixel each
    rle = {'counts': [42, 10, 348], 'size': [20, 20]}
    _write_coco(tmp_path / 'a.json', [good, *empty, rle, None])
    logs = []
    logger = MMLogger.get_current_instance()
    handler = type('H', (__import__('logging').Handler,), {'emit': lambda self, r: logs.append(r.getMessage())})()
    logger.addHandler(handler)
    try:
        dataset = CocoMaskDataset(ann_file=str(tmp_path / 'a.json'), data_prefix=dict(img=''),
                                  metainfo=dict(classes=('thing',)), pipeline=[], filter_cfg=None)
        dataset.full_init()
    finally:
        logger.removeHandler(handler)
    assert dataset.skipped_empty_masks == 5  # the four empty ones and the one without segmentation
    instances = dataset.get_data_info(0)['instances']
    assert [i['mask'] for i in instances] == [good, rle]
    assert any('skipped 5 instances with an empty mask' in line and 'a.json' in line for line in logs)
    loaded = LoadAnnotations(with_bbox=True, with_mask=True)(dict(instances=instances, ori_shape=(20, 20)))
    assert loaded['gt_masks'].areas.tolist() == [100, 10]
