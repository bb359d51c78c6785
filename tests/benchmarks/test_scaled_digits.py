"""The renderer behind benchmarks/bench_digits.py: deterministic, really multi-scale, labels kept."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.scaled_digits import load_digit_images, render_scaled, split_indices


@pytest.fixture(scope='module')
def all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digit_images()


@pytest.fixture
def digits(all_digits) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = all_digits
    return images[:300], labels[:300]


def _ink_box_side(x: torch.Tensor) -> torch.Tensor:
    """Longer side in pixels of the bounding box of each image's non-zero pixels (x: Tensor[N, 1, H, W])."""
    on = x[:, 0] > 0
    idx = torch.arange(x.shape[-1])

    def span(m: torch.Tensor) -> torch.Tensor:
        return torch.where(m, idx, -1).max(1).values - torch.where(m, idx, x.shape[-1]).min(1).values + 1

    return torch.maximum(span(on.any(2)), span(on.any(1)))


def _read_back(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Sample each canvas at the centres of its digit's 8x8 pixels (bilinear) -> Tensor[N, 8, 8]."""
    centres = (torch.arange(8.0) + 0.5) / 8
    size = (boxes[:, 2] - boxes[:, 0])[:, None]
    xs, ys = boxes[:, :1] + centres * size, boxes[:, 1:2] + centres * size  # canvas pixels, (N, 8)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), -1)
    return F.grid_sample(x, grid / x.shape[-1] * 2 - 1, align_corners=False)[:, 0]


def test_canvas_shape_and_range(digits):
    images, _ = digits
    x, scale, boxes = render_scaled(images, seed=0, canvas=40)
    assert x.shape == (300, 1, 40, 40) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 and (x.flatten(1).amax(1) > 0.5).all()  # every digit drawn
    assert scale.min() >= 0.5 and scale.max() <= 2.0
    assert boxes.min() >= 0 and boxes.max() <= 40  # wholly inside the canvas
    assert torch.allclose(boxes[:, 2] - boxes[:, 0], 16 * scale) and torch.allclose(boxes[:, 3] - boxes[:, 1],
                                                                                    16 * scale)


def test_deterministic_from_seed(digits):
    images, _ = digits
    a, b, c = (render_scaled(images, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a.images, c.images) and not torch.equal(a.scale, c.scale)


def test_digits_vary_in_scale(digits):
    images, _ = digits
    x, scale, _ = render_scaled(images, seed=0)
    side = _ink_box_side(x).float()
    assert side.max() / side.min() >= 3
    assert torch.corrcoef(torch.stack((side, scale)))[0, 1] > 0.9  # the ink follows the reported scale


def test_labels_preserved(digits):
    """Canvas i holds digit i, at its box: reading the box back gives image i and no other."""
    images, labels = digits
    x, _, boxes = render_scaled(images, seed=1)
    back = _read_back(x, boxes)
    assert (back - images).abs().mean() < 0.08  # pixels are 0-1; drawing and reading back both blur
    nearest = torch.cdist(back.flatten(1), images.flatten(1)).argmin(1)
    assert torch.equal(nearest, torch.arange(len(images)))
    assert labels.unique().numel() == 10


def test_split_is_fixed_disjoint_and_stratified(all_digits):
    _, labels = all_digits
    train, test = split_indices(labels, test_fraction=1 / 3, seed=0)
    train2, test2 = split_indices(labels, test_fraction=1 / 3, seed=0)
    assert torch.equal(train, train2) and torch.equal(test, test2)
    assert not torch.equal(test, split_indices(labels, test_fraction=1 / 3, seed=1)[1])
    assert not set(train.tolist()) & set(test.tolist()) and len(train) + len(test) == len(labels)
    share = torch.bincount(labels[test]) / torch.bincount(labels)
    assert torch.allclose(share, torch.full_like(share, 1 / 3), atol=0.01)


def test_rejects_digits_larger_than_canvas(digits):
    with pytest.raises(ValueError, match='larger than the 24 px canvas'):
        render_scaled(digits[0][:2], seed=0, canvas=24, nominal=16, scale_range=(0.5, 2.0))
