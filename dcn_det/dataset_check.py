"""Check a config's annotation files and image folders before anything is built.

Without it, a missing file or a corrupt annotation JSON surfaces as a ``FileNotFoundError`` or
``JSONDecodeError`` traceback from pycocotools once the model is built and the runner starts. The
paths are resolved as mmengine's ``BaseDataset`` resolves them (relative ``ann_file`` and
``data_prefix`` entries under ``data_root``); an evaluator's ``ann_file`` is used as written, as
mmdet's ``CocoMetric`` does. Remote paths (``s3://...``) are left to their file backend. Every
annotation JSON is parsed once here, so a truncated download is caught before training, not after; where the
config trains masks (a mask head, or ``LoadAnnotations(with_mask=True)``) or evaluates them (``segm``), a COCO
file whose annotations hold no ``segmentation`` at all is refused too.
"""
import json
import os.path as osp
from typing import Any, Sequence, Tuple

from dcn_det.data.wrappers import leaf_datasets


class DatasetFileError(Exception):
    """An annotation file or image folder named by the config is missing or unreadable."""


def check_dataset_files(cfg: Any, mode: str) -> None:
    """Raise :class:`DatasetFileError` (one line naming the path and the config key) unless the
    datasets and evaluators a ``mode`` run uses have their files in place.

    ``'train'`` checks ``train_dataloader``, and ``val_dataloader`` / ``val_evaluator`` when the
    config has a complete val loop (as mmengine's Runner decides); ``'test'`` checks
    ``test_dataloader`` / ``test_evaluator``. Dataset wrappers (``RepeatDataset``,
    ``ConcatDataset``, ...) are looked into.
    """
    loaders, evaluators = _sections(cfg, mode)
    mask_model = (cfg.get('model') or {}).get('roi_head', {}).get('mask_head') is not None
    for loader in loaders:
        if cfg.get(loader) is not None:
            for where, dataset in leaf_datasets(cfg[loader].get('dataset'), f'{loader}.dataset'):
                masks = loader == 'train_dataloader' and (mask_model or _loads_masks(dataset.get('pipeline')))
                _check_dataset(where, dataset, masks)
    for name in evaluators:
        metrics = cfg.get(name)
        metrics = metrics if isinstance(metrics, (list, tuple)) else [metrics]
        for i, metric in enumerate(metrics):
            if isinstance(metric, dict) and metric.get('ann_file'):
                key = name if len(metrics) == 1 else f'{name}.{i}'
                kinds = metric.get('metric', 'bbox')
                masks = 'segm' in (kinds if isinstance(kinds, (list, tuple)) else [kinds])
                _check_annotations(f'{key}.ann_file', metric['ann_file'], f'set {key}.ann_file', masks)


def _sections(cfg: Any, mode: str) -> Tuple[Sequence[str], Sequence[str]]:
    if mode not in ('train', 'test'):
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    if mode == 'test':
        return ['test_dataloader'], ['test_evaluator']
    if all(cfg.get(k) is not None for k in ('val_cfg', 'val_dataloader', 'val_evaluator')):
        return ['train_dataloader', 'val_dataloader'], ['val_evaluator']
    return ['train_dataloader'], []


def _resolve(data_root: str, path: str) -> str:
    return osp.join(data_root, path) if data_root and not osp.isabs(path) else path


def _loads_masks(pipeline) -> bool:
    return any(isinstance(step, dict) and str(step.get('type', '')).endswith('LoadAnnotations')
               and step.get('with_mask') for step in pipeline or [])


def _check_dataset(where: str, dataset: dict, masks: bool = False) -> None:
    root = dataset.get('data_root') or ''
    fix = f'set data_root (--cfg-options {where}.data_root=DIR)'
    if dataset.get('ann_file'):
        _check_annotations(f'{where}.ann_file', _resolve(root, dataset['ann_file']), f'{fix} or ann_file', masks)
    for key, prefix in (dataset.get('data_prefix') or {}).items():
        if isinstance(prefix, str) and (root or prefix):
            folder = _resolve(root, prefix)
            if not _remote(folder) and not osp.isdir(folder):
                raise DatasetFileError(f'{where}.data_prefix.{key}: folder {folder!r} does not exist: '
                                       f'{fix} or data_prefix.{key}')


def _check_annotations(where: str, path: str, fix: str, masks: bool = False) -> None:
    if _remote(path):
        return
    if not osp.isfile(path):
        state = 'is a folder, not a file' if osp.isdir(path) else 'does not exist'
        raise DatasetFileError(f'{where}: annotation file {path!r} {state}: {fix}')
    if path.endswith('.json'):
        try:
            with open(path, 'rb') as f:
                data = json.load(f)
        except OSError as e:
            raise DatasetFileError(f'{where}: cannot read annotation file {path!r} ({e.strerror}): '
                                   'make it readable') from None
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8/16/32 text
            raise DatasetFileError(f'{where}: annotation file {path!r} is not valid JSON ({e}): it is '
                                   'truncated or corrupt; regenerate or download it again') from None
        annotations = data.get('annotations') if masks and isinstance(data, dict) else None
        if annotations and not any(isinstance(a, dict) and 'segmentation' in a for a in annotations):
            raise DatasetFileError(f"{where}: annotation file {path!r} has no 'segmentation' in any of its "
                                   f'{len(annotations)} annotations, and the config trains or evaluates masks: '
                                   'use a dataset with instance masks, or a box-only config')


def _remote(path: str) -> bool:
    return '://' in path
