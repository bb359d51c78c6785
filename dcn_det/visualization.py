"""Where deformable layers sample: capture their offset maps, compose them, draw them (DCNv1 Fig. 5).

For an activation unit of the top deformable layer, its 3x3 kernel reads its input at 9 locations
``q * stride - padding + k * dilation + offset_k(q)``. Each of those, read as a unit of the deformable
layer below, samples 9 locations of its own input, and so on: 3 layers give 9**3 = 729 points, the
figures of the DCN papers. Plain layers in between (1x1 convs, a dense strided 3x3) are taken as the
identity at their centre, as the papers do.

Coordinates: a unit at index ``u`` of a feature map of stride ``S`` is centred on pixel ``u * S`` of
the network input (true of every ResNet conv, whose kernel ``k`` stride 2 padding ``k // 2`` centres
output ``u`` on input ``2u``). Pixel coordinates are pixel indices (pixel ``i`` is centred on ``i``,
as ``imshow`` draws it), ``(y, x)`` order throughout. The test pipeline's resize maps pixel centres
onto pixel centres (cv2), so an input pixel ``x_r`` is original pixel ``(x_r + 0.5) / scale - 0.5``.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from dcn_det.checkpoint import atomic_write, build_detector  # noqa: F401  (part of this module's API)

LEVEL_COLOURS = ('#ffd700', '#00a2ff', '#ff1a1a', '#b000ff', '#00e0a0')  # top layer first; deepest red-ish
UNIT_COLOUR = '#22dd22'  # the activation unit: green, as in the papers


@dataclass
class OffsetMap:
    """What one deformable layer did in one forward pass (first image of the batch).

    Attributes:
        name: the layer's name in the model, e.g. ``backbone.layer4.2.conv2``.
        offset (Tensor[K, 2, H, W]): ``(dy, dx)`` of each of the ``K`` kernel points (row-major over
            the kernel), in pixels of the layer's input feature map, averaged over deform groups.
        mask (Tensor[K, H, W] | None): DCNv2's modulation (after the sigmoid), None for DCNv1.
        kernel_size, stride, padding, dilation: the layer's conv geometry, ``(h, w)`` pairs.
        in_stride: network-input pixels per pixel of the layer's input; the output's is
            ``in_stride * stride``.
    """
    name: str
    offset: Tensor
    mask: Optional[Tensor]
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    in_stride: int

    @property
    def out_stride(self) -> Tuple[int, int]:
        return self.in_stride * self.stride[0], self.in_stride * self.stride[1]

    def mean_abs_offset(self) -> float:
        """Mean length of the offsets, in network-input pixels: 0 for an untrained layer."""
        return self.offset.norm(dim=1).mean().item() * self.in_stride


def deformable_layers(module: nn.Module, prefix: str = '') -> Dict[str, nn.Module]:
    """The deformable convs in ``module``, in registration (for a ResNet: forward) order.

    A deformable conv is a module with an ``nn.Conv2d`` ``conv_offset`` (mmcv's and dcn_det's
    ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``).
    """
    return {prefix + name: m for name, m in module.named_modules()
            if isinstance(getattr(m, 'conv_offset', None), nn.Conv2d)}


def is_modulated(layer: nn.Module) -> bool:
    from mmcv.ops import ModulatedDeformConv2d

    return isinstance(layer, ModulatedDeformConv2d)


def _feature_stride(input_hw: Sequence[int], feat_hw: Sequence[int]) -> int:
    """The power-of-two stride that turns an ``input_hw`` image into an ``feat_hw`` map."""
    for k in range(8):  # stride-2 convs with padding give ceil(h / 2) at each step
        if all(math.ceil(i / 2**k) == f for i, f in zip(input_hw, feat_hw, strict=True)):
            return 2**k
    return 2**round(math.log2(input_hw[0] / feat_hw[0]))  # convs without padding: floor instead


class OffsetCapture:
    """Record the offset (and mask) maps of ``layers`` with forward hooks on their ``conv_offset``.

    Example:
        >>> with OffsetCapture(layers) as capture:
        ...     model.extract_feat(inputs)
        >>> maps = capture.maps(inputs.shape[-2:])  # List[OffsetMap] in forward order
    """

    def __init__(self, layers: Dict[str, nn.Module]) -> None:
        self.layers = layers
        self._raw: Dict[str, Tuple[Tuple[int, int], Tensor]] = {}
        self._handles: list = []

    def __enter__(self) -> 'OffsetCapture':
        for name, layer in self.layers.items():
            self._handles.append(layer.conv_offset.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def record(module: nn.Module, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
            if name in self._raw:
                raise RuntimeError(f'deformable layer {name} ran twice in one capture: offsets can be '
                                   'captured for one forward pass of one image only')
            self._raw[name] = (tuple(inputs[0].shape[-2:]), output[0].detach().double().cpu())
        return record

    def maps(self, input_hw: Sequence[int]) -> List[OffsetMap]:
        """The captured layers in the order they ran; ``input_hw`` is the (padded) network input's size."""
        missing = sorted(set(self.layers) - set(self._raw))
        if missing:
            raise RuntimeError(f'deformable layers {missing} did not call their conv_offset in the forward '
                               'pass: their offsets cannot be captured')
        return [self._split(name, _feature_stride(input_hw, feat_hw), out)
                for name, (feat_hw, out) in self._raw.items()]

    def _split(self, name: str, in_stride: int, out: Tensor) -> OffsetMap:
        layer = self.layers[name]
        conv = layer.conv_offset
        kh, kw = conv.kernel_size
        mask = None
        if is_modulated(layer):  # mmcv's split: (o1, o2, m) -> offset = cat(o1, o2), mask = sigmoid(m)
            o1, o2, m = torch.chunk(out, 3, dim=0)
            offset = torch.cat((o1, o2), dim=0)
            mask = torch.sigmoid(m).reshape(-1, kh * kw, *m.shape[-2:]).mean(0)
        else:
            offset = out
        # mmcv's layout: channel (g * K + k) * 2 + {0: dy, 1: dx}
        offset = offset.reshape(-1, kh * kw, 2, *offset.shape[-2:]).mean(0)
        return OffsetMap(name, offset, mask, (kh, kw), tuple(conv.stride), tuple(conv.padding),
                         tuple(conv.dilation), in_stride)


def _bilinear(field: Tensor, pos: Tensor) -> Tensor:
    """``field (Tensor[..., H, W])`` at ``pos (Tensor[P, 2])`` (y, x) -> ``Tensor[P, ...]``.

    Outside the map the border value is used: no unit exists there, and the deformable conv reads
    zeros from it, so the nearest unit's offsets are as good a continuation as any.
    """
    h, w = field.shape[-2:]
    y = pos[:, 0].clamp(0, h - 1)
    x = pos[:, 1].clamp(0, w - 1)
    y0, x0 = y.floor().clamp(max=max(h - 2, 0)).long(), x.floor().clamp(max=max(w - 2, 0)).long()
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    fy, fx = y - y0, x - x0
    flat = field.reshape(-1, h, w)
    val = (flat[:, y0, x0] * (1 - fy) * (1 - fx) + flat[:, y0, x1] * (1 - fy) * fx
           + flat[:, y1, x0] * fy * (1 - fx) + flat[:, y1, x1] * fy * fx)
    return val.T.reshape(len(pos), *field.shape[:-2])


def nearest_unit(top: OffsetMap, point: Sequence[float]) -> Tuple[int, int]:
    """The unit of ``top``'s output map centred nearest to network-input pixel ``point`` (y, x)."""
    h, w = top.offset.shape[-2:]
    sy, sx = top.out_stride
    return (min(max(round(point[0] / sy), 0), h - 1), min(max(round(point[1] / sx), 0), w - 1))


def sampling_locations(maps: Sequence[OffsetMap], unit: Tuple[int, int]) -> List[Tuple[Tensor, Tensor]]:
    """Compose the sampling locations of ``unit`` of ``maps[-1]`` down through ``maps[-2]``, ...

    Args:
        maps: deformable layers in forward order; the last one holds the activation unit.
        unit: ``(row, col)`` in the last layer's output map.

    Returns:
        One ``(points (Tensor[9**i, 2]), weight (Tensor[9**i]))`` per layer, top layer first (i = 1):
        the sampling locations in that layer's input, as ``(y, x)`` network-input pixels, and the
        product of the DCNv2 masks along each path (ones for DCNv1). Point ``j`` of level ``i + 1``
        is kernel point ``j % 9`` of the unit at point ``j // 9`` of level ``i``.
    """
    pos = torch.tensor([unit], dtype=torch.float64)  # in the current layer's output grid
    weight = torch.ones(1, dtype=torch.float64)
    levels = []
    for i, m in enumerate(reversed(maps)):
        if i:
            pos = levels[-1][0] / torch.tensor(m.out_stride, dtype=torch.float64)
        (kh, kw), stride, pad, dil = m.kernel_size, m.stride, m.padding, m.dilation
        ky, kx = torch.meshgrid(torch.arange(kh, dtype=torch.float64), torch.arange(kw, dtype=torch.float64),
                                indexing='ij')
        kernel = torch.stack((ky * dil[0] - pad[0], kx * dil[1] - pad[1]), -1).reshape(-1, 2)  # [K, 2]
        regular = pos[:, None, :] * torch.tensor(stride, dtype=torch.float64) + kernel  # [P, K, 2]
        points = (regular + _bilinear(m.offset, pos)) * m.in_stride
        ones = torch.ones(len(pos), kh * kw, dtype=torch.float64)
        mask = ones if m.mask is None else _bilinear(m.mask, pos)
        weight = (weight[:, None] * mask).reshape(-1)
        levels.append((points.reshape(-1, 2), weight))
    return levels


def to_original(points: Tensor, scale_factor: Sequence[float]) -> Tensor:
    """Network-input pixels ``(y, x)`` -> pixels of the image before the test pipeline's resize.

    ``scale_factor`` is mmdet's ``(w_scale, h_scale)``.
    """
    scale = torch.tensor((scale_factor[1], scale_factor[0]), dtype=points.dtype)
    return (points + 0.5) / scale - 0.5


def to_input(points: Tensor, scale_factor: Sequence[float]) -> Tensor:
    """Inverse of :func:`to_original`."""
    scale = torch.tensor((scale_factor[1], scale_factor[0]), dtype=points.dtype)
    return (points + 0.5) * scale - 0.5


@dataclass
class Panel:
    """One image point explained: the unit of the top layer nearest to it, its centre and its composed
    sampling locations (``(y, x)`` original pixels)."""
    label: str
    point: Tuple[float, float]
    unit: Tuple[int, int]
    centre: Tuple[float, float]
    levels: List[Tuple[Tensor, Tensor]]


def plot_sampling(image: np.ndarray, panels: Sequence[Panel], layer_names: Sequence[str], out: str,
                  suptitle: str = '') -> None:
    """Draw ``panels`` side by side on ``image (ndarray[H, W, 3], RGB uint8)`` into the PNG ``out``.

    Each level gets one colour (the top layer's 9 points largest, the deepest level's smallest);
    with DCNv2 masks a point's opacity and size follow its path weight, relative to its level's
    largest. The image is drawn mostly desaturated, so that the points stand out on any colour.
    Written through a temporary file, so ``out`` is either complete or absent.
    """
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure  # no pyplot: no global backend, Agg via savefig

    h, w = image.shape[:2]
    grey = image.astype(np.float32).mean(-1, keepdims=True)
    background = (0.25 * image + 0.75 * grey).astype(np.uint8)
    panel_w = 5.0
    fig = Figure(figsize=(panel_w * len(panels), panel_w * h / w + 1.2), layout='constrained')
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    n = len(layer_names)
    for ax, panel in zip(axes, panels, strict=True):
        ax.imshow(background)
        for i in reversed(range(n)):  # deepest level first, so the top layer's points stay visible
            points, weight = panel.levels[i]
            rel = (weight / weight.max()).numpy() if weight.max() > 0 else np.ones(len(weight))
            colour = np.tile(np.array(to_rgba(LEVEL_COLOURS[i % len(LEVEL_COLOURS)])), (len(rel), 1))
            colour[:, 3] = 0.25 + 0.75 * rel
            size = (48.0 / (i + 1)) * (0.3 + 0.7 * rel)
            ax.scatter(points[:, 1].numpy(), points[:, 0].numpy(), s=size, c=colour,
                       edgecolors='black' if i == 0 else 'none', linewidths=0.6,
                       label=f'{layer_names[n - 1 - i]}: {len(points)} pts')
        ax.scatter([panel.centre[1]], [panel.centre[0]], s=160, marker='*', c=UNIT_COLOUR,
                   edgecolors='black', linewidths=0.8, label='activation unit')
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_axis_off()
        ax.set_title(f'{panel.label} at x={panel.point[1]:.0f}, y={panel.point[0]:.0f}: '
                     f'unit (row {panel.unit[0]}, col {panel.unit[1]})', fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    order = [len(labels) - 1] + list(reversed(range(len(labels) - 1)))  # unit, then top layer first
    legend = fig.legend([handles[i] for i in order], [labels[i] for i in order], loc='outside lower center',
                        ncol=min(len(labels), 2 if len(panels) == 1 else 4), fontsize=8, markerscale=1.5)
    for handle in legend.legend_handles:
        handle.set_alpha(1)  # a handle takes its first point's opacity
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100), suffix='.png')



# The detector side: build it, pick its layers, run it once, turn image points into panels.

def select_layers(model: nn.Module, names: Optional[Sequence[str]] = None,
                  count: int = 3) -> Dict[str, nn.Module]:
    """The backbone's deformable layers ``names`` (``backbone.`` may be left off), else its last ``count``.

    Returned in the order given; :class:`OffsetCapture` orders them as they run.

    Raises:
        ValueError: the backbone has no deformable layer, or a name is not one of them (the message
            lists the valid names).
    """
    available = deformable_layers(model.backbone, 'backbone.')
    if not available:
        raise ValueError('the model has no deformable layer in its backbone: use a DCN config (one that '
                         'sets model.backbone.dcn and stage_with_dcn), e.g. configs/faster_rcnn_dcnv2.py')
    if not names:
        return dict(list(available.items())[-count:])
    chosen = {}
    for name in names:
        full = name if name in available else f'backbone.{name}'
        if full not in available:
            raise ValueError(f'{name!r} is not a deformable layer of this model; choose from '
                             f'{", ".join(available)}')
        if full in chosen:
            raise ValueError(f'layer {full} is given twice')
        chosen[full] = available[full]
    return chosen


def capture(model: nn.Module, image: np.ndarray, layers: Dict[str, nn.Module]):
    """Run ``model`` once on ``image (ndarray[H, W, 3], BGR)`` through its test pipeline.

    Returns:
        ``(maps, result)``: the :class:`OffsetMap` of each of ``layers`` in forward order, and mmdet's
        ``DetDataSample`` (``pred_instances`` in original pixels, ``scale_factor`` in its metainfo).
    """
    from mmdet.apis import inference_detector

    with OffsetCapture(layers) as recorder:
        result = inference_detector(model, image)
    return recorder.maps(result.metainfo['batch_input_shape']), result


def default_points(result, image_hw: Sequence[int], classes: Sequence[str] = (), count: int = 3,
                   score_thr: float = 0.3) -> List[Tuple[str, Tuple[float, float]]]:
    """The image centre, then the box centres of the ``count`` best detections scoring ``score_thr`` or more.

    Returns ``(label, (y, x))`` pairs in original pixels.
    """
    h, w = image_hw
    points = [('image centre', ((h - 1) / 2, (w - 1) / 2))]
    pred = result.pred_instances
    keep = (pred.scores >= score_thr).nonzero().flatten()
    for i in keep[pred.scores[keep].argsort(descending=True)][:count].tolist():
        x1, y1, x2, y2 = pred.bboxes[i].tolist()
        label = int(pred.labels[i])
        name = classes[label] if label < len(classes) else f'class {label}'
        # boxes are in continuous coordinates (pixel i spans [i, i + 1)): its centre is pixel index c - 0.5
        points.append((f'{name} {pred.scores[i]:.2f}', ((y1 + y2) / 2 - 0.5, (x1 + x2) / 2 - 0.5)))
    return points


def make_panels(maps: Sequence[OffsetMap], points: Sequence[Tuple[str, Tuple[float, float]]],
                scale_factor: Sequence[float] = (1.0, 1.0)) -> List[Panel]:
    """For each ``(label, (y, x))`` original-pixel point: the unit of ``maps[-1]`` nearest to it, composed."""
    panels = []
    for label, point in points:
        at_input = to_input(torch.tensor(point, dtype=torch.float64), scale_factor)
        unit = nearest_unit(maps[-1], at_input.tolist())
        centre = to_original(torch.tensor(unit, dtype=torch.float64) * torch.tensor(maps[-1].out_stride),
                             scale_factor)
        levels = [(to_original(p, scale_factor), wt) for p, wt in sampling_locations(maps, unit)]
        panels.append(Panel(label, tuple(point), unit, tuple(centre.tolist()), levels))
    return panels
