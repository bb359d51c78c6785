"""A small COCO-format detection dataset of drawn shapes, written offline and deterministically from a seed.

`make demo` trains a deformable Faster R-CNN on CPU in minutes, so it needs a dataset that is small,
needs no download, and rewards what deformable convolutions are for: geometric variation. Here the
class is the shape's geometry and nothing else:

- scale: object size (the longer side of the unrotated shape) is log-uniform in [min_size, max_size],
  16-128 px by default (8x);
- aspect and rotation: an anisotropic stretch of up to `max_aspect` (2.5) and any rotation;
- occlusion: objects overlap (a share of them is placed next to an earlier one) and are cut by the
  image border;
- clutter: a smooth noisy background, random strokes, soft-edged blobs and specks that are not objects,
  and a few thin strokes drawn over the objects;
- colour: random colours and textures (solid, stripes, gradient, noise) for objects and clutter alike,
  each object picked to contrast with what lies under it, so colour never tells the class.

Usage::

    python tools/make_demo_data.py --out data/shapes                  # 400 train / 100 val, 320x320
    python tools/make_demo_data.py --out data/shapes2 --classes heart,crescent,arrow,chevron

and in an mmdet config (file_name is relative to the split folder)::

    metainfo = dict(classes=('ellipse', 'triangle', 'star', 'cross', 'ring'))
    train_dataloader = dict(dataset=dict(
        data_root='data/shapes/', metainfo=metainfo,
        ann_file='annotations/instances_train.json', data_prefix=dict(img='train/')))

Annotation rules:

- ``bbox`` and ``area`` are of the *visible* pixels (modal boxes, as in COCO): what a detector can see.
- Occlusion rule: objects are painted one at a time; a placement (of an object, or of a stroke drawn
  over the objects) that would leave any object with less than `min_visibility` (0.3) of its pixels
  visible, counting the part cut off by the border, is rejected and the placement re-drawn (an object
  that finds no place in a few tries is left out). So every object in an image is annotated, with no
  unlabelled object that training would learn as background, and each is at least 30% visible.
  ``visibility`` (an extra annotation field) records the fraction.
- ``segmentation`` is the mask of the *visible* pixels (modal, as ``bbox`` and ``area``), as COCO's
  uncompressed RLE ``{'counts': [...], 'size': [h, w]}``: the ring's hole and the parts hidden by other
  objects or strokes are not in it, so a mask head learns what it can see. (An outline polygon cannot
  hold the hole, and an amodal one would ask the mask head for pixels another object covers.)
  ``area`` is the mask's pixel count.

This module imports numpy and PIL only, no torch, mmcv or mmdet (importing it through the package still
runs dcn_det's mmcv check).
"""
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Shape = tuple[np.ndarray, list[np.ndarray]]  # outline (N, 2) x, y and holes, in a [-1, 1] box


def _circle(r: float = 1.0, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _arc(r: float, cx: float, start: float, stop: float, n: int = 32) -> np.ndarray:
    t = np.linspace(start, stop, n)
    return np.stack([cx + r * np.cos(t), r * np.sin(t)], axis=1)


# Each shape draws its own small intra-class variation (arm width, hole size...) from rng; the
# stretch, rotation and size applied afterwards are common to all.
def _ellipse(rng: np.random.Generator) -> Shape:
    return _circle(), []


def _triangle(rng: np.random.Generator) -> Shape:
    t = np.deg2rad([90, 210, 330])
    return np.stack([np.cos(t), np.sin(t)], axis=1), []


def _square(rng: np.random.Generator) -> Shape:
    return np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], float), []


def _star(rng: np.random.Generator) -> Shape:
    t = np.pi / 2 + np.arange(10) * np.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1), []


def _cross(rng: np.random.Generator) -> Shape:
    a = rng.uniform(0.22, 0.38)
    return np.array([(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1),
                     (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)], float), []


def _ring(rng: np.random.Generator) -> Shape:
    return _circle(), [_circle(rng.uniform(0.5, 0.68))]


def _arrow(rng: np.random.Generator) -> Shape:
    neck, shaft, head = rng.uniform(0.0, 0.35), rng.uniform(0.14, 0.24), rng.uniform(0.5, 0.7)
    return np.array([(-1, -shaft), (neck, -shaft), (neck, -head), (1, 0),
                     (neck, head), (neck, shaft), (-1, shaft)], float), []


def _heart(rng: np.random.Generator) -> Shape:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1), []


def _crescent(rng: np.random.Generator) -> Shape:
    # The unit disc minus a disc of radius r centred at (d, 0): the outer arc runs round the left,
    # the inner arc comes back along the bite.
    r, d = rng.uniform(0.75, 0.9), rng.uniform(0.35, 0.55)
    x = (1 - r * r + d * d) / (2 * d)
    y = math.sqrt(1 - x * x)
    outer_from = math.atan2(y, x)
    inner_to = math.atan2(y, x - d)
    outer = _arc(1.0, 0.0, outer_from, 2 * np.pi - outer_from)
    inner = _arc(r, d, 2 * np.pi - inner_to, inner_to)
    return np.concatenate([outer, inner[1:-1]]), []


def _chevron(rng: np.random.Generator) -> Shape:
    t = rng.uniform(0.6, 0.9)
    return np.array([(-1, -1), (-1 + t, -1), (1, 0), (-1 + t, 1), (-1, 1), (1 - t, 0)], float), []


SHAPES: dict[str, Callable[[np.random.Generator], Shape]] = {
    'ellipse': _ellipse, 'triangle': _triangle, 'square': _square, 'star': _star, 'cross': _cross,
    'ring': _ring, 'arrow': _arrow, 'heart': _heart, 'crescent': _crescent, 'chevron': _chevron,
}
DEFAULT_CLASSES = ('ellipse', 'triangle', 'star', 'cross', 'ring')

_SUPERSAMPLE = 4  # anti-aliased edges: a 16 px star is still a star
_TRIES = 12  # placements tried per object before it is left out
_NEAR = 0.4  # share of objects placed next to an earlier one, so that objects overlap
_MIN_CONTRAST = 70.0  # RGB distance between an object's colour and 90% of what it covers of each owner
_FORMAT_VERSION = '1.1'  # bump when the files written for the same arguments change
_PREVIEW_COLOURS = [(255, 255, 0), (0, 255, 255), (255, 0, 255), (255, 128, 0), (0, 255, 0), (255, 255, 255)]


def _normalise(shape: Shape) -> Shape:
    """Centre the outline's box on 0 and scale its longer side to 2."""
    outer, holes = shape
    lo, hi = outer.min(0), outer.max(0)
    centre, half = (lo + hi) / 2, (hi - lo).max() / 2
    return (outer - centre) / half, [(h - centre) / half for h in holes]


class _Sprite:
    """Anti-aliased coverage ``alpha (float32[h, w])`` of one drawn item, its top-left at (x0, y0)."""

    def __init__(self, x0: int, y0: int, alpha: np.ndarray) -> None:
        self.x0, self.y0, self.alpha = x0, y0, alpha
        self.mask = alpha >= 0.5  # the pixels the item owns
        self.pixels = int(self.mask.sum())  # counting those off the image

    @classmethod
    def draw(cls, points: np.ndarray, pad: float, paint: Callable, blur: float = 0.0) -> '_Sprite':
        """Rasterise ``paint(draw, to_canvas)`` over the box of ``points (float[N, 2])`` grown by pad,
        then blur it by a Gaussian of `blur` pixels.

        Pixel (row, col) covers [col, col + 1) x [row, row + 1) in image coordinates.
        """
        x0, y0 = np.floor(points.min(0) - pad).astype(int) - 1
        x1, y1 = np.ceil(points.max(0) + pad).astype(int) + 1
        w, h = x1 - x0, y1 - y0
        canvas = Image.new('L', (w * _SUPERSAMPLE, h * _SUPERSAMPLE), 0)

        def to_canvas(p: np.ndarray) -> list[tuple[float, float]]:
            # PIL puts a canvas pixel's centre at its integer coordinate
            return [tuple(q) for q in ((p - (x0, y0)) * _SUPERSAMPLE - 0.5).tolist()]

        paint(ImageDraw.Draw(canvas), to_canvas)
        canvas = canvas.reduce(_SUPERSAMPLE)  # box filter: coverage
        if blur:
            canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
        return cls(int(x0), int(y0), np.asarray(canvas, np.float32) / 255)

    @classmethod
    def polygon(cls, outer: np.ndarray, holes: Sequence[np.ndarray] = (), blur: float = 0.0) -> '_Sprite':
        def paint(draw: ImageDraw.ImageDraw, to_canvas: Callable) -> None:
            draw.polygon(to_canvas(outer), fill=255)
            for hole in holes:
                draw.polygon(to_canvas(hole), fill=0)
        return cls.draw(outer, 2 * blur, paint, blur)

    @classmethod
    def stroke(cls, points: np.ndarray, width: float) -> '_Sprite':
        def paint(draw: ImageDraw.ImageDraw, to_canvas: Callable) -> None:
            draw.line(to_canvas(points), fill=255, width=max(1, round(width * _SUPERSAMPLE)), joint='curve')
        return cls.draw(points, width, paint)

    def window(self, size: int) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
        """(image, sprite) index pairs of the part inside a size x size image; None if none is."""
        h, w = self.alpha.shape
        ix0, iy0 = max(self.x0, 0), max(self.y0, 0)
        ix1, iy1 = min(self.x0 + w, size), min(self.y0 + h, size)
        if ix0 >= ix1 or iy0 >= iy1:
            return None
        return ((slice(iy0, iy1), slice(ix0, ix1)),
                (slice(iy0 - self.y0, iy1 - self.y0), slice(ix0 - self.x0, ix1 - self.x0)))


def _colour(rng: np.random.Generator, under: Sequence[np.ndarray] = ()) -> np.ndarray:
    """A random colour that stands out from nearly all pixels of each group ``under[i] (float[N, 3])``
    it will cover (the best of a few candidates): groups, so that it stands out from each object it
    overlaps, not just from the background around them."""
    candidates = rng.uniform(0, 255, (16 if under else 1, 3))
    if not under:
        return candidates[0]
    contrast = np.full(len(candidates), np.inf)
    for pixels in under:
        pixels = pixels[:: max(1, len(pixels) // 256)]
        distance = np.linalg.norm(candidates[:, None] - pixels[None], axis=2)
        contrast = np.minimum(contrast, np.percentile(distance, 10, axis=1))
    ok = np.flatnonzero(contrast >= _MIN_CONTRAST)
    return candidates[ok[0] if ok.size else contrast.argmax()]


def _texture(rng: np.random.Generator, h: int, w: int, colour: np.ndarray) -> np.ndarray:
    """float32[h, w, 3] fill around `colour`: solid, stripes, gradient or noise."""
    kind = rng.choice(4, p=[0.4, 0.2, 0.2, 0.2])
    if kind == 0:
        return np.broadcast_to(colour.astype(np.float32), (h, w, 3))
    other = np.clip(colour + rng.choice([-1, 1], 3) * rng.uniform(30, 60, 3), 0, 255)
    if kind == 3:
        t = rng.uniform(0, 0.6, (h, w)).astype(np.float32)
    else:
        angle = rng.uniform(0, np.pi)
        xx, yy = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)[:, None]
        along = xx * np.cos(angle) + yy * np.sin(angle)
        if kind == 1:
            t = (np.sin(along * (2 * np.pi / rng.uniform(3, 9))) > 0).astype(np.float32)
        else:
            t = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    return (colour + (other - colour) * t[..., None]).astype(np.float32)


class _Canvas:
    """The image being drawn and, per pixel, which object shows there (0: background or clutter)."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.rng, self.size = rng, size
        low, high = rng.uniform(0, 255, (2, 3))
        cells = int(rng.integers(2, 7))
        field = Image.fromarray(rng.uniform(0, 1, (cells, cells)).astype(np.float32), 'F')
        field = np.clip(np.asarray(field.resize((size, size), Image.Resampling.BICUBIC)), 0, 1)
        self.image = (low + (high - low) * field[..., None]).astype(np.float32)
        self.image += 6 * rng.standard_normal((size, size, 3), dtype=np.float32)
        self.owner = np.zeros((size, size), np.int16)
        self.full_pixels: list[int] = []  # per object, its whole area, off-image part included

    def fits(self, sprite: _Sprite, owner: int, min_visibility: float) -> bool:
        """Whether painting `sprite` for `owner` (0: clutter) leaves every object, a new one included,
        with at least min_visibility of its pixels visible."""
        window = sprite.window(self.size)
        if window is None:
            return False
        (iy, ix), (sy, sx) = window
        mask = sprite.mask[sy, sx]
        full = self.full_pixels + [sprite.pixels] * (owner > len(self.full_pixels))
        visible = np.bincount(self.owner.ravel(), minlength=len(full) + 1)
        visible -= np.bincount(self.owner[iy, ix][mask], minlength=visible.size)
        visible[owner] += mask.sum()
        return bool(np.all(visible[1:] >= min_visibility * np.array(full)))

    def under(self, sprite: _Sprite) -> list[np.ndarray]:
        """The pixels (float[N, 3]) under the in-image part of `sprite`, one group per owner."""
        (iy, ix), (sy, sx) = sprite.window(self.size)
        mask = sprite.mask[sy, sx]
        pixels, owners = self.image[iy, ix][mask], self.owner[iy, ix][mask]
        return [pixels[owners == k] for k in np.unique(owners)]

    def paint(self, sprite: _Sprite, colour: np.ndarray, owner: int) -> None:
        window = sprite.window(self.size)
        if window is None:
            return
        (iy, ix), (sy, sx) = window
        alpha = sprite.alpha[sy, sx, None]
        fill = _texture(self.rng, *alpha.shape[:2], colour)
        self.image[iy, ix] = self.image[iy, ix] * (1 - alpha) + fill * alpha
        self.owner[iy, ix][sprite.mask[sy, sx]] = owner
        if owner > len(self.full_pixels):
            self.full_pixels.append(sprite.pixels)


def _random_walk(rng: np.random.Generator, size: int, steps: int, step: tuple[float, float]) -> np.ndarray:
    points = [rng.uniform(0, size, 2)]
    heading = rng.uniform(0, 2 * np.pi)
    for _ in range(steps):
        heading += rng.normal(0, 0.8)
        points.append(points[-1] + rng.uniform(*step) * np.array([np.cos(heading), np.sin(heading)]))
    return np.array(points)


def _clutter_under(canvas: _Canvas, rng: np.random.Generator, max_size: int) -> None:
    """Strokes, smudges and specks that are not objects, under them."""
    size = canvas.size
    for _ in range(rng.integers(3, 9)):
        walk = _random_walk(rng, size, int(rng.integers(1, 5)), (0.1 * size, 0.4 * size))
        canvas.paint(_Sprite.stroke(walk, rng.uniform(1, 4)), _colour(rng), 0)
    for _ in range(rng.integers(1, 5)):
        # Blobs with soft edges and partly transparent: sharp-edged blobs turned out to look like
        # arrows and triangles, unlabelled objects of the classes.
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        k = np.arange(2, 5)[:, None]
        r = 1 + (rng.uniform(0, 0.2, (3, 1)) * np.cos(k * t + rng.uniform(0, 2 * np.pi, (3, 1)))).sum(0)
        radius = rng.uniform(6, 0.5 * max_size)
        blob = radius * np.stack([r * np.cos(t), r * np.sin(t)], axis=1) + rng.uniform(0, size, 2)
        sprite = _Sprite.polygon(blob, blur=0.3 * radius)
        sprite.alpha *= rng.uniform(0.3, 0.7)
        canvas.paint(sprite, _colour(rng), 0)
    for _ in range(rng.integers(4, 16)):
        speck = _circle(rng.uniform(1, 3), n=12) + rng.uniform(0, size, 2)
        canvas.paint(_Sprite.polygon(speck), _colour(rng), 0)


def _render_image(rng: np.random.Generator, spec: dict) -> tuple[np.ndarray, list[dict]]:
    """One image (uint8[S, S, 3]) and its annotations (no ids yet)."""
    size, min_visibility = spec['image_size'], spec['min_visibility']
    canvas = _Canvas(rng, size)
    _clutter_under(canvas, rng, spec['max_size'])

    placed: list[tuple[int, np.ndarray, float, np.ndarray]] = []  # label, centre, radius, outline
    lo, hi = spec['objects_per_image']
    for _ in range(rng.integers(lo, hi + 1)):
        label = int(rng.integers(len(spec['classes'])))
        # log-uniform: as many small objects as large ones
        side = math.exp(rng.uniform(math.log(spec['min_size']), math.log(spec['max_size'])))
        for _ in range(_TRIES):
            outer, holes = _normalise(SHAPES[spec['classes'][label]](rng))
            stretch = math.exp(rng.uniform(0, math.log(spec['max_aspect'])))
            angle = rng.uniform(0, 2 * np.pi)
            if placed and rng.uniform() < _NEAR:
                _, other, other_radius, _ = placed[rng.integers(len(placed))]
                heading = rng.uniform(0, 2 * np.pi)
                distance = rng.uniform(0.35, 0.85) * (other_radius + side / 2)
                centre = other + distance * np.array([np.cos(heading), np.sin(heading)])
            else:
                centre = rng.uniform(0.25 * side, size - 0.25 * side, 2)
            c, s = math.cos(angle), math.sin(angle)
            matrix = np.array([[c, -s], [s, c]]) @ np.diag([side / 2, side / 2 / stretch])
            outer, holes = outer @ matrix.T + centre, [h @ matrix.T + centre for h in holes]
            sprite = _Sprite.polygon(outer, holes)
            if canvas.fits(sprite, len(placed) + 1, min_visibility):
                canvas.paint(sprite, _colour(rng, canvas.under(sprite)), len(placed) + 1)
                placed.append((label, centre, side / 2, outer))
                break

    for _ in range(rng.integers(0, 3)):  # thin strokes over the objects: clutter occludes too
        walk = _random_walk(rng, size, int(rng.integers(1, 4)), (0.1 * size, 0.3 * size))
        sprite = _Sprite.stroke(walk, rng.uniform(1, 2.5))
        if canvas.fits(sprite, 0, min_visibility):
            canvas.paint(sprite, _colour(rng), 0)

    annotations = []
    for k, (label, *_) in enumerate(placed, start=1):
        ys, xs = np.nonzero(canvas.owner == k)
        x, y = int(xs.min()), int(ys.min())
        annotations.append({
            'category_id': label + 1,
            'bbox': [x, y, int(xs.max()) - x + 1, int(ys.max()) - y + 1],
            'area': int(xs.size),
            'iscrowd': 0,
            'segmentation': rle_encode(canvas.owner == k),
            'visibility': round(xs.size / canvas.full_pixels[k - 1], 3),
        })
    return np.clip(np.rint(canvas.image), 0, 255).astype(np.uint8), annotations


def rle_encode(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of ``mask (bool[H, W])``: run lengths over the column-major pixels,
    starting with a run of zeros (pycocotools' ``frPyObjects`` reads it)."""
    flat = np.asarray(mask, bool).ravel(order='F')
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {'counts': counts, 'size': list(mask.shape)}


def _check_args(classes: Sequence[str], num_train: int, num_val: int, image_size: int, min_size: int,
                max_size: int, objects_per_image: tuple[int, int], max_aspect: float,
                min_visibility: float) -> None:
    if isinstance(classes, str) or not classes:
        raise ValueError(f'classes must be a non-empty sequence of shape names, got {classes!r}')
    for name in classes:
        if name not in SHAPES:
            raise ValueError(f'unknown class {name!r}: choose from {", ".join(SHAPES)}')
    if len(set(classes)) != len(classes):
        raise ValueError(f'classes must not repeat a name, got {", ".join(classes)}')
    if num_train < 1 or num_val < 1:
        raise ValueError(f'num_train and num_val must be at least 1, got {num_train} and {num_val}')
    if not 8 <= min_size <= max_size:
        raise ValueError(f'need 8 <= min_size <= max_size (smaller shapes are unrecognisable), '
                         f'got min_size={min_size}, max_size={max_size}')
    if max_size > image_size // 2:
        raise ValueError(f'max_size={max_size} does not fit image_size={image_size}: objects may be at most '
                         f'half the image side ({image_size // 2}); lower max_size or raise image_size')
    if not 1 <= objects_per_image[0] <= objects_per_image[1]:
        raise ValueError(f'objects_per_image must be (low, high) with 1 <= low <= high, '
                         f'got {objects_per_image}')
    if max_aspect < 1:
        raise ValueError(f'max_aspect is a stretch factor and must be >= 1, got {max_aspect}')
    if not 0 < min_visibility <= 1:
        raise ValueError(f'min_visibility is a fraction in (0, 1], got {min_visibility}')


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f'{out_dir} exists and is not a directory: delete it or choose another out_dir')
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f'{out_dir} already exists and is not empty: delete it or choose another '
                              f'out_dir (or pass overwrite=True, --overwrite on the command line)')


def _write_split(root: Path, split: str, seed: int, num_images: int, spec: dict,
                 categories: list[dict], progress: Callable[[str, int, int], None] | None) -> dict:
    (root / split).mkdir()
    images, annotations = [], []
    for index in range(num_images):
        # one stream per image: image i is the same whatever num_train/num_val are
        rng = np.random.default_rng(np.random.SeedSequence([seed, ('train', 'val').index(split), index]))
        pixels, anns = _render_image(rng, spec)
        image_id = index + 1
        file_name = f'{image_id:06d}.png'
        Image.fromarray(pixels).save(root / split / file_name, format='PNG', optimize=False, compress_level=6)
        images.append({'id': image_id, 'file_name': file_name, 'width': spec['image_size'],
                       'height': spec['image_size']})
        for ann in anns:
            annotations.append({'id': len(annotations) + 1, 'image_id': image_id, **ann})
        if progress is not None:
            progress(split, image_id, num_images)
    coco = {
        'info': {'description': f'dcn_det synthetic shapes, {split} split', 'version': _FORMAT_VERSION,
                 'generator': {'seed': seed, **spec}},
        'images': images, 'annotations': annotations, 'categories': categories,
    }
    with open(root / 'annotations' / f'instances_{split}.json', 'w', encoding='utf-8') as f:
        json.dump(coco, f, separators=(',', ':'))
    return coco


def _write_preview(root: Path, coco: dict, count: int = 8) -> None:
    """preview.png: the first images of `coco` with their boxes and class names, to look at first."""
    names = {c['id']: c['name'] for c in coco['categories']}
    images = coco['images'][:count]
    size, cols = images[0]['width'], min(4, len(images))
    sheet = Image.new('RGB', (cols * size, -(-len(images) // cols) * size))
    for i, image in enumerate(images):
        tile = Image.open(root / 'train' / image['file_name']).convert('RGB')
        draw = ImageDraw.Draw(tile)
        for a in coco['annotations']:
            if a['image_id'] == image['id']:
                x, y, w, h = a['bbox']
                colour = _PREVIEW_COLOURS[(a['category_id'] - 1) % len(_PREVIEW_COLOURS)]
                draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour)
                draw.text((x + 2, y + 1), names[a['category_id']], fill=colour)
        sheet.paste(tile, ((i % cols) * size, (i // cols) * size))
    sheet.save(root / 'preview.png', format='PNG', optimize=False, compress_level=6)


def _overlapping_pairs(annotations: list[dict]) -> int:
    """Pairs of boxes in the same image that intersect."""
    by_image: dict[int, list[list[int]]] = {}
    for a in annotations:
        by_image.setdefault(a['image_id'], []).append(a['bbox'])
    pairs = 0
    for boxes in by_image.values():
        b = np.array(boxes, float)
        lo = np.maximum(b[:, None, :2], b[None, :, :2])
        hi = np.minimum(b[:, None, :2] + b[:, None, 2:], b[None, :, :2] + b[None, :, 2:])
        pairs += int(np.triu((hi > lo).all(-1), 1).sum())
    return pairs


def _summary(out_dir: Path, seed: int, spec: dict, cocos: dict[str, dict]) -> dict:
    every = [a for coco in cocos.values() for a in coco['annotations']]
    w, h = np.array([a['bbox'][2:] for a in every], float).T
    side = np.sqrt(w * h)
    visibility = np.array([a['visibility'] for a in every])
    return {
        'out_dir': str(out_dir), 'seed': seed, 'classes': list(spec['classes']),
        'image_size': spec['image_size'],
        'images': {split: len(coco['images']) for split, coco in cocos.items()},
        'objects': {split: len(coco['annotations']) for split, coco in cocos.items()},
        'objects_per_class': {name: sum(a['category_id'] == i + 1 for a in every)
                              for i, name in enumerate(spec['classes'])},
        'box_size_px': [round(float(side.min()), 1), round(float(side.max()), 1)],  # sqrt(w * h)
        'scale_ratio': round(float(side.max() / side.min()), 1),
        'box_aspect_range': [round(float((w / h).min()), 2), round(float((w / h).max()), 2)],
        'occluded_share': round(float((visibility < 0.95).mean()), 3),  # cut by others, clutter or border
        'min_visibility': float(visibility.min()),
        'overlapping_box_pairs': sum(_overlapping_pairs(coco['annotations']) for coco in cocos.values()),
    }


def generate(out_dir: str | os.PathLike, *, seed: int = 0, num_train: int = 400, num_val: int = 100,
             image_size: int = 320, classes: Sequence[str] = DEFAULT_CLASSES, min_size: int = 16,
             max_size: int = 128, objects_per_image: tuple[int, int] = (2, 6), max_aspect: float = 2.5,
             min_visibility: float = 0.3, overwrite: bool = False,
             progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write a COCO-format shapes dataset to `out_dir` and return a summary of it.

    Writes ``out_dir/{train,val}/NNNNNN.png`` (named by image id), ``out_dir/annotations/
    instances_{train,val}.json`` and ``out_dir/preview.png`` (the first train images with their boxes);
    category ids are 1..len(classes) in the order given. The same arguments give byte-identical files.
    Everything is written to a temporary sibling ``<out_dir>.tmp-*`` that is renamed into place at the
    end, so an interrupted run never leaves a partial dataset at `out_dir` (a killed one may leave the
    temporary sibling behind).

    Args:
        out_dir: where to write; must not exist or be empty, unless `overwrite`.
        seed: the seed everything is drawn from.
        num_train, num_val: number of images per split.
        image_size: side of the square images, in pixels.
        classes: shape names, from :data:`SHAPES`.
        min_size, max_size: range of object sizes (the longer side before rotation), in pixels.
        objects_per_image: (low, high) objects drawn per image; a few may find no place.
        max_aspect: the largest stretch of a shape along one axis.
        min_visibility: the least visible share of any object (see the module docstring).
        overwrite: replace an existing non-empty `out_dir`.
        progress: called with (split, images done, images in split) after each image.

    Returns:
        Counts per split and class, the range of box sizes (sqrt(w * h)) and aspects, the share of
        occluded objects and the number of overlapping box pairs.

    Raises:
        ValueError: an argument is out of range (nothing is written).
        FileExistsError: `out_dir` is not empty and `overwrite` is False (nothing is written).
    """
    classes = tuple(classes) if not isinstance(classes, str) else classes
    _check_args(classes, num_train, num_val, image_size, min_size, max_size, tuple(objects_per_image),
                max_aspect, min_visibility)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    spec = {'image_size': image_size, 'classes': list(classes), 'min_size': min_size, 'max_size': max_size,
            'objects_per_image': list(objects_per_image), 'max_aspect': max_aspect,
            'min_visibility': min_visibility}
    categories = [{'id': i + 1, 'name': name, 'supercategory': 'shape'} for i, name in enumerate(classes)]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'{out_dir.name}.tmp-', dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        (tmp / 'annotations').mkdir()
        cocos = {split: _write_split(tmp, split, seed, n, spec, categories, progress)
                 for split, n in (('train', num_train), ('val', num_val))}
        _write_preview(tmp, cocos['train'])
        if out_dir.exists():  # empty, or overwrite: move it aside so the swap is two renames
            old = tmp.with_name(tmp.name.replace('.tmp-', '.old-'))
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _summary(out_dir, seed, spec, cocos)
