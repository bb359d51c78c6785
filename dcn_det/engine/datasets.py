"""mmdet's ``CocoDataset`` for instance masks, with each empty mask skipped and counted instead of trained on.

mmdet keeps an instance whose mask is empty (``"segmentation": []`` stops ``LoadAnnotations`` with a
``KeyError``; a zero-area polygon becomes an all-background mask target under a box that says otherwise).
"""
from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS
from mmengine.logging import print_log


@DATASETS.register_module()
class CocoMaskDataset(CocoDataset):
    """``CocoDataset`` that drops (non-crowd) instances whose mask has no pixel: no ``segmentation``, an
    empty one, polygons of zero area (or fewer than 3 points), or an RLE with no foreground run. How many
    it dropped is logged once, with the annotation file. ``skipped_empty_masks`` holds the count."""

    def load_data_list(self) -> list[dict]:
        self.skipped_empty_masks = 0
        data_list = super().load_data_list()
        if self.skipped_empty_masks:
            print_log(f'{self.ann_file}: skipped {self.skipped_empty_masks} instances with an empty mask '
                      '(zero-area polygon, empty segmentation or RLE without pixels)', logger='current')
        return data_list

    def parse_data_info(self, raw_data_info: dict) -> dict:
        data_info = super().parse_data_info(raw_data_info)
        kept = [i for i in data_info['instances'] if i['ignore_flag'] or mask_area(i.get('mask')) > 0]
        self.skipped_empty_masks += len(data_info['instances']) - len(kept)
        data_info['instances'] = kept
        return data_info


def mask_area(segmentation) -> float:
    """Pixels (polygons: their shoelace area) of a COCO ``segmentation``: a list of polygons
    ``[x1, y1, x2, y2, ...]`` or an RLE dict (``counts`` a list of run lengths, or compressed text)."""
    if not segmentation:
        return 0.0
    if isinstance(segmentation, dict):
        counts = segmentation.get('counts')
        if isinstance(counts, list):
            return float(sum(counts[1::2]))  # runs alternate background, foreground
        from pycocotools import mask as mask_utils

        return float(mask_utils.area(dict(segmentation, counts=counts.encode() if isinstance(counts, str)
                                          else counts)))
    area = 0.0
    for polygon in segmentation:
        if len(polygon) >= 6:
            x, y = polygon[0::2], polygon[1::2]
            area += abs(sum(x[i] * y[i - 1] - x[i - 1] * y[i] for i in range(len(x)))) / 2
    return area
