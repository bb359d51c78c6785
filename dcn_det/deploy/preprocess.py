"""What a deployed detector takes as input, read from its config, and image preparation that matches it.

The split (mmdeploy's and torchvision's conventions meet here): **resizing and padding happen outside
the graph**, because the output size of a keep-ratio resize depends on each image and mmdet rounds it
in Python; **normalisation happens inside the graph** (mean/std, BGR->RGB, zeroing the padding), so
a caller feeds plain pixels and cannot get the statistics wrong. :class:`InputSpec` holds the
parameters of both halves; it is written into the ONNX file's metadata and read back from it, so an
``.onnx`` file alone says how to feed it.

:func:`prepare` reproduces mmdet's test pipeline (``LoadImageFromFile`` -> ``Resize`` -> ``PackDetInputs``)
with numpy and cv2 only, bit for bit (tested against the pipeline itself): ``mmcv.imrescale``'s size
rule ``int(w * s + 0.5)``, ``cv2.resize`` with ``INTER_LINEAR`` on the uint8 image, and mmdet's scale
factor ``new_w / w``. Nothing here imports torch, mmcv or mmdet.
"""
import json
import math
import os
import os.path as osp
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple, Optional, Sequence

import cv2
import numpy as np

from dcn_det.data.wrappers import outermost_with

# cv2.imread's formats; a folder given to the tools is searched for these
IMAGE_EXTENSIONS = ('.bmp', '.jpeg', '.jpg', '.png', '.tif', '.tiff', '.webp')

_LOADERS = ('LoadImageFromFile',)
_IGNORED = ('LoadAnnotations', 'PackDetInputs')  # ground truth and packing: nothing to do at inference


class ConfigNotDeployableError(ValueError):
    """A config whose input pipeline or preprocessor cannot be reproduced by :func:`prepare`."""


class ImageReadError(OSError):
    """An image file that is missing or cannot be decoded."""


@dataclass(frozen=True)
class InputSpec:
    """The detector's input contract.

    Outside the graph: decode as cv2 does (BGR, 8-bit), resize to ``scale`` ((w, h), mmdet's order)
    keeping the aspect ratio when ``keep_ratio`` (the long side fits ``max(scale)``, the short side
    ``min(scale)``), and pad at the bottom/right to a multiple of ``pad_size_divisor``. Inside:
    reverse the channels if ``bgr_to_rgb``, ``(x - mean) / std``, then set the padding to ``pad_value``.
    """
    scale: tuple[int, int]
    keep_ratio: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr_to_rgb: bool
    pad_size_divisor: int
    pad_value: float
    to_float32: bool = False  # LoadImageFromFile(to_float32=True): resize the float image, unrounded

    @classmethod
    def from_config(cls, cfg) -> 'InputSpec':
        """Read the test pipeline and ``model.data_preprocessor`` of an mmengine config.

        Raises:
            ConfigNotDeployableError: a pipeline step or preprocessor setting that this module does not
                reproduce, named in the message.
        """
        pipeline = _test_pipeline(cfg)
        where = 'test_dataloader.dataset.pipeline'
        load = resize = None
        for step in pipeline:
            kind = str(step.get('type', '')).split('.')[-1]
            if kind in _LOADERS:
                load = step
            elif kind == 'Resize':
                resize = step
            elif kind not in _IGNORED:
                raise ConfigNotDeployableError(
                    f"{where} has a {step.get('type')!r} step, which deployment does not reproduce (supported: "
                    f"{', '.join(_LOADERS + ('Resize',) + _IGNORED)}); test with a plain pipeline instead")
        if load is None or resize is None:
            raise ConfigNotDeployableError(f'{where} needs a LoadImageFromFile and a Resize step, got '
                                           f"{[s.get('type') for s in pipeline]}")
        for key, want in (('color_type', 'color'), ('imdecode_backend', 'cv2'), ('channel_order', 'bgr')):
            if load.get(key, want) != want:
                raise ConfigNotDeployableError(f'{where}: LoadImageFromFile({key}={load[key]!r}) is not supported '
                                               f'(deployment decodes with {key}={want!r})')
        scale = resize.get('scale')
        if scale is None or resize.get('scale_factor') is not None:
            raise ConfigNotDeployableError(f'{where}: Resize needs a fixed scale=(w, h), got {dict(resize)}')
        scale = (int(scale), int(scale)) if isinstance(scale, (int, float)) else tuple(int(s) for s in scale)
        for key, want in (('interpolation', 'bilinear'), ('backend', 'cv2')):
            if resize.get(key, want) != want:
                raise ConfigNotDeployableError(f'{where}: Resize({key}={resize[key]!r}) is not supported '
                                               f'(deployment resizes with {key}={want!r})')
        pre = dict(cfg.model.get('data_preprocessor') or {})
        if pre.get('batch_augments'):
            raise ConfigNotDeployableError('model.data_preprocessor.batch_augments is not supported')
        mean, std = pre.get('mean'), pre.get('std')
        if (mean is None) != (std is None):
            raise ConfigNotDeployableError('model.data_preprocessor sets only one of mean and std')
        return cls(scale=scale, keep_ratio=bool(resize.get('keep_ratio', False)),
                   mean=tuple(float(v) for v in (mean or (0, 0, 0))), std=tuple(float(v) for v in (std or (1, 1, 1))),
                   bgr_to_rgb=bool(pre.get('bgr_to_rgb', False) or pre.get('rgb_to_bgr', False)),
                   pad_size_divisor=int(pre.get('pad_size_divisor', 1)), pad_value=float(pre.get('pad_value', 0)),
                   to_float32=bool(load.get('to_float32', False)))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> 'InputSpec':
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**data)

    def differences(self, other: 'InputSpec') -> list[tuple[str, object, object]]:
        """``[(field, value here, value in other), ...]`` for the fields that differ."""
        return [(f.name, getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of an image of ``height x width`` after the resize (mmcv's ``rescale_size`` rule)."""
        if not self.keep_ratio:
            return self.scale[1], self.scale[0]
        factor = min(max(self.scale) / max(height, width), min(self.scale) / min(height, width))
        return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)

    def default_shape(self) -> tuple[int, int]:
        """The smallest padded (H, W) that holds every resized image: square for a keep-ratio resize."""
        side = max(self.scale) if self.keep_ratio else None
        h, w = (side, side) if side else (self.scale[1], self.scale[0])
        return self.pad(h), self.pad(w)

    def pad(self, size: int) -> int:
        d = max(self.pad_size_divisor, 1)
        return int(math.ceil(size / d) * d)


class Prepared(NamedTuple):
    """One resized image: ``image (ndarray[3, h, w])`` (uint8 or float32), ``scale_factor (w, h)``."""
    image: np.ndarray
    scale_factor: tuple[float, float]


def read_image(path: str) -> np.ndarray:
    """``ndarray[H, W, 3]`` uint8 BGR, decoded as mmcv does (``cv2.imdecode(..., IMREAD_COLOR)``).

    Raises:
        ImageReadError: the file is missing or not a decodable image.
    """
    if not osp.isfile(path):
        raise ImageReadError(f'{path}: no such file')
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(f'{path}: cannot read ({e.strerror or e})') from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ImageReadError(f'{path}: not an image cv2 can decode')
    return image


def prepare(image: np.ndarray, spec: InputSpec) -> Prepared:
    """Resize ``image (ndarray[H, W, 3], BGR)`` as the config's test pipeline does."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'image must be an ndarray[H, W, 3] (BGR), got shape {image.shape}')
    h, w = image.shape[:2]
    if spec.to_float32:
        image = image.astype(np.float32)
    new_h, new_w = spec.resized_size(h, w)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return Prepared(np.ascontiguousarray(resized.transpose(2, 0, 1)), (new_w / w, new_h / h))


def make_batch(images: Sequence[np.ndarray], scale_factors: Sequence[Sequence[float]], spec: InputSpec,
               shape: Optional[tuple[int, int]] = None) -> dict[str, np.ndarray]:
    """The graph's inputs (:data:`dcn_det.deploy.metadata.INPUTS`) for resized images
    ``images (ndarray[3, h_i, w_i])`` and their ``scale_factors`` ((w, h) from the original image).

    Pads to ``shape`` (H, W) when given (a model with a fixed input), else to the largest image
    rounded up to ``pad_size_divisor``, as mmdet's ``DetDataPreprocessor`` pads a batch.

    Raises:
        ValueError: an image larger than ``shape``; the message says how to export for it.
    """
    sizes = [im.shape[1:] for im in images]
    if shape is None:
        shape = (spec.pad(max(s[0] for s in sizes)), spec.pad(max(s[1] for s in sizes)))
    for h, w in sizes:
        if h > shape[0] or w > shape[1]:
            raise ValueError(f'an image resized by the config is {h}x{w} (h x w), larger than the model\'s fixed '
                             f'input {shape[0]}x{shape[1]}: export with --dynamic, or with --shape covering it '
                             f'(e.g. --shape {spec.default_shape()[0]} {spec.default_shape()[1]})')
    batch = np.zeros((len(images), 3, *shape), dtype=np.float32)
    for out, im in zip(batch, images, strict=True):
        out[:, :im.shape[1], :im.shape[2]] = im
    return {'images': batch,
            'img_shapes': np.array(sizes, dtype=np.float32).reshape(-1, 2),
            'scale_factors': np.array(scale_factors, dtype=np.float64).reshape(-1, 2)}


def find_images(inputs: Sequence[str]) -> list[str]:
    """Files named in ``inputs``, and the images under each folder in it (recursively, sorted)."""
    found = []
    for item in inputs:
        if osp.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs.sort()
                found += [osp.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        else:
            found.append(item)  # a missing file is reported (and skipped) when it is read
    return found


def _test_pipeline(cfg) -> list:
    loader = cfg.get('test_dataloader') or {}
    dataset = outermost_with(loader.get('dataset') or {}, 'pipeline')
    pipeline = dataset.get('pipeline') or cfg.get('test_pipeline')
    if not pipeline:
        raise ConfigNotDeployableError('the config has no test pipeline (test_dataloader.dataset.pipeline)')
    return list(pipeline)
