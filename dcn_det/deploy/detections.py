"""One image's detections, and how to tell whether two runtimes found the same ones."""
from typing import NamedTuple

import numpy as np


class Detections(NamedTuple):
    """One image's detections, by falling score: ``boxes (float32[K, 4])`` (x1, y1, x2, y2) in
    original-image pixels, ``scores (float32[K])``, ``labels (int64[K])``."""
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def above(self, score_thr: float) -> 'Detections':
        keep = self.scores >= score_thr
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])


def count_unmatched(got, want, score_tol: float = 1e-4, box_tol: float = 1e-2) -> int:
    """How many detections of ``got`` find no partner in ``want`` (each ``(boxes, scores, labels)`` or a
    :class:`Detections`), pairing greedily by falling score: same label, score
    within ``score_tol``, every coordinate within ``box_tol`` px. Order among equal scores is free."""
    boxes, scores, labels = (np.asarray(x) for x in got)
    w_boxes, w_scores, w_labels = (np.asarray(x) for x in want)
    fits = ((labels[:, None] == w_labels[None]) & (np.abs(scores[:, None] - w_scores[None]) <= score_tol)
            & (np.abs(boxes[:, None] - w_boxes[None]).max(-1, initial=0) <= box_tol))
    free = np.ones(len(w_scores), dtype=bool)
    missing = 0
    for i in np.argsort(-scores, kind='stable'):
        candidates = np.flatnonzero(fits[i] & free)
        if candidates.size:
            free[candidates[0]] = False
        else:
            missing += 1
    return missing
