"""Handwritten digits at random scales: scikit-learn's 8x8 ``load_digits`` pasted into a larger canvas.

A small, offline stand-in for the scaled-MNIST experiment of deformable-convolution reproductions:
each digit is upsampled bilinearly to ``nominal * scale`` pixels, with ``scale`` log-uniform in
``scale_range``, and placed at a uniformly random position where it lies wholly inside the canvas.
With the defaults (nominal 16 px, scales 0.5-2, canvas 40) digits are 8-32 px tall, so a digit is
never drawn below its native 8 px (no aliasing) and its size varies 4x.

    >>> images, labels = load_digit_images()
    >>> drawn = render_scaled(images[:4], seed=0)
    >>> drawn.images.shape, labels[:4].tolist()
    (torch.Size([4, 1, 40, 40]), [0, 1, 2, 3])
"""
import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class Rendered(NamedTuple):
    """images (Tensor[N, 1, canvas, canvas]), scale (Tensor[N]) and where each digit's h x w frame lies,
    boxes (Tensor[N, 4]) (x0, y0, x1, y1) in canvas pixels (pixel i covers [i, i + 1])."""
    images: Tensor
    scale: Tensor
    boxes: Tensor


def load_digit_images() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 handwritten digits: images (Tensor[1797, 8, 8], float32 in [0, 1]) and labels
    (Tensor[1797], int64). Bundled with scikit-learn, so no download."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)  # pixel values are 0..16
    return images, torch.from_numpy(digits.target.astype(np.int64))


def split_indices(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Stratified train/test split of ``range(len(labels))``, fixed by ``seed``: (train_idx, test_idx)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f'test_fraction must be in (0, 1), got {test_fraction}')
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def render_scaled(images: Tensor, seed: int, canvas: int = 40, nominal: float = 16.0,
                  scale_range: Sequence[float] = (0.5, 2.0)) -> Rendered:
    """Paste each digit at a random scale and position into an empty ``canvas`` x ``canvas`` image.

    Args:
        images (Tensor[N, h, w]): digits, background 0.
        seed (int): the same seed gives the same scales, positions and pixels.
        canvas (int): side of the output images in pixels.
        nominal (float): side in pixels of a digit drawn at scale 1.
        scale_range (Tuple[float, float]): scales are log-uniform in [lo, hi]; ``nominal * hi`` must fit
            in ``canvas``.

    Returns:
        :class:`Rendered` (images, scale, boxes), in the order of ``images``.
    """
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f'scale_range must be (lo, hi) with 0 < lo <= hi, got {tuple(scale_range)}')
    if nominal * hi > canvas:
        raise ValueError(f'a digit at scale {hi} is {nominal * hi:g} px, larger than the {canvas} px canvas: '
                         f'use a canvas of at least {math.ceil(nominal * hi)} or a smaller scale range')
    n = images.shape[0]
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(n, generator=gen,
                                                                                   dtype=torch.float64))
    size = nominal * scale
    corner = (canvas - size)[:, None] * torch.rand(n, 2, generator=gen, dtype=torch.float64)  # (x0, y0)
    # affine_grid maps output coordinates u in [-1, 1] (align_corners=False) to input coordinates:
    # the digit spans [x0, x0 + size] canvas pixels, so v = (canvas / size) u + (canvas - 2 x0) / size - 1.
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = canvas / size
    theta[:, :, 2] = (canvas - 2 * corner) / size[:, None] - 1
    grid = F.affine_grid(theta.float(), [n, 1, canvas, canvas], align_corners=False)
    out = F.grid_sample(images[:, None].float(), grid, mode='bilinear', padding_mode='zeros',
                        align_corners=False)
    boxes = torch.cat((corner, corner + size[:, None]), 1)
    return Rendered(out, scale.float(), boxes.float())
