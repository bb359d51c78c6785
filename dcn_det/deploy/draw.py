"""Detections drawn on an image (cv2), one colour per class."""
import colorsys
from typing import Optional, Sequence

import cv2
import numpy as np


def class_colour(label: int, num_classes: int) -> tuple[int, int, int]:
    """A BGR colour per class, evenly spaced in hue."""
    r, g, b = colorsys.hsv_to_rgb((label % max(num_classes, 1)) / max(num_classes, 1), 0.85, 1.0)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    classes: Sequence[str], masks: Optional[np.ndarray] = None) -> np.ndarray:
    """A copy of ``image (ndarray[H, W, 3], BGR)`` with each box and ``'<class> <score>'`` drawn, and each mask
    (``masks (bool[K, H, W])``, optional) tinted in its class colour with its outline.

    boxes (float32[K, 4]) (x1, y1, x2, y2) in the image's pixels; scores (float32[K]); labels (int64[K]).
    """
    out = image.copy()
    for mask, label in zip(masks if masks is not None else [], labels, strict=False):
        colour = np.array(class_colour(int(label), len(classes)), np.float32)
        out[mask] = (0.5 * out[mask] + 0.5 * colour).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 1, cv2.LINE_AA)
    thickness = max(1, round(max(image.shape[:2]) / 400))
    font_scale = max(0.4, max(image.shape[:2]) / 1200)
    for (x1, y1, x2, y2), score, label in sorted(zip(boxes, scores, labels, strict=True), key=lambda d: d[1]):
        colour = class_colour(int(label), len(classes))
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(out, p1, p2, colour, thickness, cv2.LINE_AA)
        name = classes[label] if 0 <= label < len(classes) else f'class {label}'
        text = f'{name} {score:.2f}'
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        top = p1[1] - th - base if p1[1] - th - base >= 0 else p1[1]
        cv2.rectangle(out, (p1[0], top), (p1[0] + tw, top + th + base), colour, -1)
        cv2.putText(out, text, (p1[0], top + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out
