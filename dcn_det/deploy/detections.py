"""One image's detections, and how to tell whether two runtimes found the same ones."""
from typing import NamedTuple, Optional

import numpy as np


class Detections(NamedTuple):
    """One image's detections, by falling score: ``boxes (float32[K, 4])`` (x1, y1, x2, y2) in
    original-image pixels, ``scores (float32[K])``, ``labels (int64[K])``, and for a mask model
    ``masks (bool[K, H, W])`` in the original image (None for a box-only model)."""
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: Optional[np.ndarray] = None

    def above(self, score_thr: float) -> 'Detections':
        keep = self.scores >= score_thr
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep],
                          None if self.masks is None else self.masks[keep])


def paste_masks(probs: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float) -> np.ndarray:
    """mmdet's ``FCNMaskHead`` paste: each RoI mask ``probs (float32[K, M, M])`` (foreground probabilities) is
    resampled into its box ``boxes (float32[K, 4])`` (x1, y1, x2, y2, image pixels) of an ``height x width``
    image and thresholded (``>= threshold``): ``bool[K, height, width]``.

    The same sampling as mmdet's ``_do_paste_mask`` (``grid_sample``, bilinear, ``align_corners=False``, zeros
    outside the RoI mask), written as two 1-D interpolations: pixel x's centre x + 0.5 falls at
    ``u = (x + 0.5 - x1) / (x2 - x1) * M - 0.5`` in the RoI mask's pixel coordinates.
    """
    k, m = probs.shape[0], probs.shape[-1]
    out = np.zeros((k, height, width), dtype=bool)
    for i in range(k):
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        # mmdet's window: the box grown by a pixel, clipped to the image
        c0, r0 = max(int(np.floor(x1)) - 1, 0), max(int(np.floor(y1)) - 1, 0)
        c1, r1 = min(int(np.ceil(x2)) + 1, width), min(int(np.ceil(y2)) + 1, height)
        if c1 <= c0 or r1 <= r0:
            continue
        rows = _interpolation(np.arange(r0, r1, dtype=np.float32) + 0.5, y1, y2, m)
        cols = _interpolation(np.arange(c0, c1, dtype=np.float32) + 0.5, x1, x2, m)
        out[i, r0:r1, c0:c1] = rows @ probs[i].astype(np.float32) @ cols.T >= threshold
    return out


def _interpolation(centres: np.ndarray, lo: float, hi: float, m: int) -> np.ndarray:
    """``float32[len(centres), m]``: linear-interpolation weights of pixel centres over m cells spanning
    [lo, hi] (zero weight for taps outside them; a zero-size span samples the middle, as mmdet does)."""
    size = np.float32(hi - lo)
    g = (centres - np.float32(lo)) / size * 2 - 1 if size else np.zeros_like(centres)
    u = ((g + 1) * m - 1) / 2
    i0 = np.floor(u).astype(np.int64)
    frac = (u - i0).astype(np.float32)
    weights = np.zeros((len(centres), m + 2), dtype=np.float32)  # columns 0 and m+1: taps outside, dropped
    rows = np.arange(len(centres))
    np.add.at(weights, (rows, np.clip(i0, -1, m) + 1), 1 - frac)
    np.add.at(weights, (rows, np.clip(i0 + 1, -1, m) + 1), frac)
    return weights[:, 1:m + 1]


def count_unmatched(got, want, score_tol: float = 1e-4, box_tol: float = 1e-2) -> int:
    """How many detections of ``got`` find no partner in ``want`` (each ``(boxes, scores, labels)`` or a
    :class:`Detections`, whose masks are not compared), pairing greedily by falling score: same label, score
    within ``score_tol``, every coordinate within ``box_tol`` px. Order among equal scores is free."""
    boxes, scores, labels = (np.asarray(x) for x in got[:3])
    w_boxes, w_scores, w_labels = (np.asarray(x) for x in want[:3])
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
