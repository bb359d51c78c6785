"""Dataset wrappers in a config, and the datasets inside them: the one walk through them.

mmengine's and mmdet's wrappers hold what they wrap under ``dataset`` (``RepeatDataset``,
``ClassBalancedDataset``, ``MultiImageMixDataset``) or ``datasets`` (``ConcatDataset``).
"""
from typing import Any, Iterator


def outermost_with(dataset: dict, key: str) -> dict:
    """The outermost of ``dataset`` and the configs it wraps through ``dataset`` that sets ``key``, else
    the innermost of them: a wrapper's own setting (a ``MultiImageMixDataset``'s pipeline) wins."""
    levels = [dataset]
    while key not in levels[-1] and isinstance(levels[-1].get('dataset'), dict):
        levels.append(levels[-1]['dataset'])
    return levels[-1]


def leaf_datasets(dataset: Any, where: str = 'dataset') -> Iterator[tuple[str, dict]]:
    """Every dataset config under ``dataset`` that wraps no other, with its key path from ``where``."""
    if not isinstance(dataset, dict):
        return
    if isinstance(dataset.get('dataset'), dict):
        yield from leaf_datasets(dataset['dataset'], f'{where}.dataset')
    elif isinstance(dataset.get('datasets'), (list, tuple)):
        for i, d in enumerate(dataset['datasets']):
            yield from leaf_datasets(d, f'{where}.datasets.{i}')
    else:
        yield where, dataset
