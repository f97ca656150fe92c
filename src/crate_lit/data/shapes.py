"""Procedural "shapes" image classification dataset.

Every image shows exactly one geometric shape (the class) drawn with hard edges on top of a
cluttered background. Nothing is downloaded: image ``i`` of a split is generated from its own
block of raw draws of a PCG64 stream seeded by ``(seed, split)`` (block ``i``, reached by
jumping ahead), so it depends only on ``(seed, split, i)`` and the image settings: it is
identical on every machine, in every process and regardless of access order or of which other
images are generated with it. Because the shape is painted last with a single flat colour, the
ground-truth foreground mask is exact, which makes the dataset useful for checking whether
attention maps segment the object.

Images are rendered in batches: the random parameters come from each image's block, and all
pixel work is array arithmetic over the batch. Only IEEE-exact elementwise operations
(``+ - * /``, ``sqrt``, comparisons, ``rint``, ``floor``, ``ceil``, ``clip``), min/max and
integer reductions are applied to arrays, each value computed from its own image's numbers
only, so every pixel comes out the same whatever the batch. Trigonometry is evaluated on
per-image Python scalars: vectorised transcendental functions (``np.exp``, ``np.sin``...) may
differ in the last bit between CPUs, or between the SIMD body and the tail of one array, which
could flip a pixel.

``ShapesDataModule`` serves the splits to training: generated once per setting, cached on disk
and held in memory, with flips and translations applied to training batches on the device.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..runs import atomic_write
from .augment import flip_and_translate, key_uniform
from .loading import ImageDataModule, InMemoryImages

log = logging.getLogger(__name__)

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_SCALE",
    "GENERATOR_VERSION",
    "MIN_IMAGE_SIZE",
    "SPLIT_IDS",
    "ShapesDataModule",
    "ShapesDataset",
    "render_batch",
    "render_shape_image",
]

# Bump whenever the images that a given (seed, split, index, settings) produces change: a disk
# cache of generated splits keys on it.
GENERATOR_VERSION = 2

# Label order matters: ``num_classes=k`` uses the first k names. The most confusable shapes at
# low resolution (pentagon, hexagon, both close to a circle) come last so the default 10-class
# task stays crisp.
CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "crescent",
    "arrow",
    "heart",
    "l_shape",
    "pentagon",
    "hexagon",
)

SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
MIN_IMAGE_SIZE = 16

# Default range of the shape diameter as a fraction of the image side, for the generator
# (ShapesDataModule takes conf/data/shapes.yaml's 0.4-0.7 as its default).
DEFAULT_SCALE: tuple[float, float] = (0.5, 0.9)
# Minimum RGB (0..255) Euclidean distance between the shape colour and every background pixel
# it covers; keeps the shape visible against the local background.
_MIN_CONTRAST = 90
_COLOUR_CANDIDATES = 32
# Pixel noise amplitude: one random byte per value, the difference of its lowest and highest
# 2-bit fields, a triangular distribution on [-3, 3].
_NOISE = 3
_MAX_DISTRACTORS = 5
_DISTRACTOR_PARAMS = 10  # kind, alpha, RGB, up to 5 geometry parameters
# A pose that misses every pixel centre (possible at a tiny scale) is redrawn, up to this often.
_POSE_TRIES = 16
# Pixels per rendering batch (455 images at 48 px): numpy's cost per call is spread over many
# images, while the arrays of a batch stay small (tens of MB).
_BATCH_PIXELS = 1 << 20
_HEART_D = 0.79  # heart half-diagonal; outermost point ends up at radius ~0.997

# Uniform numbers at the start of an image's block of raw draws, in order. The block ends with
# the words that hold the pixel noise.
_UNIFORM_SLOTS: dict[str, int] = {
    "grey": 1,
    "tint": 3,
    "delta": 3,
    "gradient_angle": 1,
    "n_distractors": 1,
    "distractors": _MAX_DISTRACTORS * _DISTRACTOR_PARAMS,
    "bright_channel": 1,
    "candidates": _COLOUR_CANDIDATES * 3,
    "bright": _COLOUR_CANDIDATES,
    "poses": _POSE_TRIES * 4,  # diameter, x, y, angle
}
_SLOT: dict[str, slice] = {}
_N_UNIFORMS = 0
for _name, _count in _UNIFORM_SLOTS.items():
    _SLOT[_name] = slice(_N_UNIFORMS, _N_UNIFORMS + _count)
    _N_UNIFORMS += _count
del _name, _count


def _words_per_image(image_size: int) -> int:
    # Pixel noise takes one byte per value, 8 per 64-bit word.
    return _N_UNIFORMS + -(-image_size * image_size * 3 // 8)


def _regular_polygon(n: int, start: float = math.pi / 2) -> np.ndarray:
    """Vertices of a regular n-gon with circumradius 1 (unit disk), as an [n, 2] array."""
    angles = [start + 2.0 * math.pi * k / n for k in range(n)]
    return np.array([(math.cos(a), math.sin(a)) for a in angles])


def _star_kites(points: int = 5, inner: float = 0.42) -> tuple[np.ndarray, ...]:
    """A star as the convex kites (centre, inner corner, tip, inner corner) that tile it."""

    def corner(radius: float, angle: float) -> tuple[float, float]:
        return radius * math.cos(angle), radius * math.sin(angle)

    kites = []
    for k in range(points):
        tip = math.pi / 2 + 2.0 * math.pi * k / points
        notch = math.pi / points
        kites.append([(0.0, 0.0), corner(inner, tip - notch), corner(1.0, tip), corner(inner, tip + notch)])
    return tuple(np.array(kite) for kite in kites)


def _normalised(*pieces: list[tuple[float, float]]) -> tuple[np.ndarray, ...]:
    """Centre convex pieces together on their bounding-box centre and scale them into the unit
    disk."""
    v = np.concatenate([np.asarray(p, dtype=np.float64) for p in pieces])
    centre = (v.min(axis=0) + v.max(axis=0)) / 2.0
    scale = np.sqrt(((v - centre) ** 2).sum(axis=1)).max()
    return tuple((np.asarray(p, dtype=np.float64) - centre) / scale for p in pieces)


class _Shape(NamedTuple):
    """A union of convex polygons ([k, 2] vertices) and disks, minus holes; a disk is
    (centre u, centre v, radius)."""

    pieces: tuple[np.ndarray, ...] = ()
    disks: tuple[tuple[float, float, float], ...] = ()
    holes: tuple[tuple[float, float, float], ...] = ()


# Built from convex polygons and disks, which keep their kind under any pose, so shapes are tested
# directly in image coordinates: a convex polygon meets each pixel row in one interval. All
# shapes live in the unit disk of their local frame, so a centre at least one radius away from
# every border guarantees the shape is fully inside the image.
_UNIT_DISK = (0.0, 0.0, 1.0)
_SHAPES: dict[str, _Shape] = {
    "circle": _Shape(disks=(_UNIT_DISK,)),
    "square": _Shape((_regular_polygon(4, math.pi / 4),)),
    "triangle": _Shape((_regular_polygon(3),)),
    "star": _Shape(_star_kites()),
    "cross": _Shape(
        _normalised(
            [(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)], [(-0.3, -1), (0.3, -1), (0.3, 1), (-0.3, 1)]
        )
    ),
    "ring": _Shape(disks=(_UNIT_DISK,), holes=((0.0, 0.0, 0.55),)),
    "crescent": _Shape(disks=(_UNIT_DISK,), holes=((0.5, 0.0, 0.8),)),
    "arrow": _Shape(
        _normalised([(-1, -0.2), (0.15, -0.2), (0.15, 0.2), (-1, 0.2)], [(0.15, -0.6), (1, 0), (0.15, 0.6)])
    ),
    # A square standing on its corner plus two disks on its upper sides: the deep notch keeps it
    # distinct from a circle/triangle even at 32 px. Shifted by 0.26 d to fit the unit disk.
    "heart": _Shape(
        (np.array([(1.0, -0.26), (0.0, 0.74), (-1.0, -0.26), (0.0, -1.26)]) * _HEART_D,),
        disks=tuple(
            (sign * _HEART_D / 2, 0.24 * _HEART_D, _HEART_D / math.sqrt(2.0)) for sign in (1.0, -1.0)
        ),
    ),
    "l_shape": _Shape(
        _normalised([(0, 0), (1, 0), (1, 0.4), (0, 0.4)], [(0, 0.4), (0.4, 0.4), (0.4, 1.3), (0, 1.3)])
    ),
    "pentagon": _Shape((_regular_polygon(5),)),
    "hexagon": _Shape((_regular_polygon(6),)),
}


# Shapes as flat tables of primitives, so that the shapes of a whole batch, whatever their
# classes, are rasterised with one call per kind of primitive. Polygons are padded to a common
# vertex count by repeating their last vertex: a zero-length edge never meets a row.
_MAX_VERTICES = 6


def _padded(piece: np.ndarray) -> np.ndarray:
    return np.concatenate([piece, np.repeat(piece[-1:], _MAX_VERTICES - len(piece), axis=0)])


def _table(field: str) -> tuple[np.ndarray, np.ndarray]:
    """All primitives of kind ``field`` of _Shape, stacked, and the class of each."""
    rows = [(label, p) for label, name in enumerate(CLASS_NAMES) for p in getattr(_SHAPES[name], field)]
    values = [_padded(p) if field == "pieces" else np.array(p) for _, p in rows]
    return np.array(values, dtype=np.float64), np.array([label for label, _ in rows])


# (primitives, their classes, painted or cut out), in painting order: holes last.
_PRIMITIVES = ((*_table("pieces"), True), (*_table("disks"), True), (*_table("holes"), False))


class _Poses(NamedTuple):
    """m placements (arrays [m]): centre, radius, and cosine/sine of the rotation."""

    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray
    cos: np.ndarray
    sin: np.ndarray

    def place(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image coordinates [m, k] of local points (u, v), [k] or [m, k]. Image y points down,
        so shapes appear flipped vertically, which is fine under random rotation."""
        c, s, r = self.cos[:, None], self.sin[:, None], self.radius[:, None]
        return self.cx[:, None] + r * (c * u - s * v), self.cy[:, None] + r * (s * u + c * v)


def _cos_sin(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Element by element on purpose: see the module docstring.
    return np.array([math.cos(a) for a in angles]), np.array([math.sin(a) for a in angles])


@lru_cache(maxsize=16)
def _pixel_centres(image_size: int) -> np.ndarray:
    # Pixel centres, so the rasterisation is symmetric and independent of image_size.
    c = np.arange(image_size, dtype=np.float64) + 0.5
    c.setflags(write=False)
    return c


# Everything is drawn row by row: a convex polygon or a disk meets a pixel row in one interval,
# so m objects are described by arrays left, right [m, rows], and only the pixels in those
# intervals are touched. A pixel belongs to an object when its centre lies in [left, right).


def _convex_rows(ys: np.ndarray, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intervals (left, right [m, len(ys)]; inf, -inf where they miss) where the rows at
    heights ys meet m convex polygons with vertices (px, py) [m, k]. [left, right) holds
    exactly the points that the even-odd rule puts inside, for a ray cast to the right."""
    # Edges on axis 1 and rows last: numpy is slow on short innermost axes.
    x1, y1 = px[:, :, None], py[:, :, None]
    x2, y2 = np.roll(x1, -1, axis=1), np.roll(y1, -1, axis=1)
    straddles = (y1 > ys) != (y2 > ys)  # [m, edges, rows]
    slope = (x2 - x1) / np.where(y2 == y1, 1.0, y2 - y1)  # horizontal edges never straddle
    x_cross = x1 + (ys - y1) * slope
    return np.where(straddles, x_cross, np.inf).min(axis=1), np.where(straddles, x_cross, -np.inf).max(axis=1)


def _disk_rows(
    ys: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Intervals (left, right [m, len(ys)]) where the rows at heights ys meet m disks."""
    h2 = (r * r)[:, None] - (ys - cy[:, None]) ** 2
    h = np.sqrt(np.maximum(h2, 0.0))
    return np.where(h2 > 0.0, cx[:, None] - h, np.inf), cx[:, None] + h


def _row_pixels(left: np.ndarray, right: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixels in the intervals (left, right [m, image_size]) of m objects, as (row,
    column), where row counts the m * image_size rows of all objects in order."""
    lo = np.clip(np.ceil(left - 0.5), 0, image_size).astype(np.intp)
    hi = np.clip(np.ceil(right - 0.5), 0, image_size).astype(np.intp)
    lengths = np.maximum(hi - lo, 0).reshape(-1)
    row = np.repeat(np.arange(lengths.size), lengths)
    first = np.cumsum(lengths) - lengths  # where each row's pixels start in the output
    return row, np.arange(row.size) - (first - lo.reshape(-1))[row]


def _row_starts(images: np.ndarray, image_size: int, planes: int) -> np.ndarray:
    """Flat index of pixel (row, 0) of each row of images [m] in an array [n, planes, H, W]."""
    return ((images[:, None] * planes * image_size + np.arange(image_size)) * image_size).reshape(-1)


def _rasterise(labels: np.ndarray, poses: _Poses, image_size: int) -> np.ndarray:
    """Masks [m, H, W] of the shapes of classes labels [m] at poses [m]."""
    c = _pixel_centres(image_size)
    masks = np.zeros(len(labels) * image_size * image_size, dtype=bool)
    for table, classes, fill in _PRIMITIVES:
        owner, index = np.nonzero(labels[:, None] == classes)
        pose = _Poses(*(a[owner] for a in poses))
        if table.ndim == 3:  # convex polygons [k, vertices, 2]
            left, right = _convex_rows(c, *pose.place(table[index, :, 0], table[index, :, 1]))
        else:  # disks [k, (centre u, centre v, radius)]
            cx, cy = pose.place(table[index, :1], table[index, 1:2])
            left, right = _disk_rows(c, cx[:, 0], cy[:, 0], pose.radius * table[index, 2])
        row, column = _row_pixels(left, right, image_size)
        masks[_row_starts(owner, image_size, 1)[row] + column] = fill
    return masks.reshape(len(labels), image_size, image_size)


def _check_scale(scale: object) -> tuple[float, float]:
    message = (
        f"shape_scale must be [min, max] with 0 < min <= max <= 1 (fractions of the image side), got {scale}"
    )
    try:
        low, high = (float(v) for v in scale)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(message)
    return low, high


def _place_shapes(
    u: np.ndarray, labels: np.ndarray, image_size: int, scale: tuple[float, float]
) -> np.ndarray:
    """Rasterise each image's shape with random size, rotation and position: bool [n, H, W]."""
    n, s = len(u), float(image_size)
    poses = u[:, _SLOT["poses"]].reshape(n, _POSE_TRIES, 4)
    masks = np.empty((n, image_size, image_size), dtype=bool)
    todo = np.arange(n)
    for attempt in range(_POSE_TRIES):
        p = poses[todo, attempt]
        radius = (scale[0] + (scale[1] - scale[0]) * p[:, 0]) * s / 2.0
        cx = radius + (s - 2.0 * radius) * p[:, 1]
        cy = radius + (s - 2.0 * radius) * p[:, 2]
        cos, sin = _cos_sin(2.0 * math.pi * p[:, 3])
        masks[todo] = _rasterise(labels[todo], _Poses(cx, cy, radius, cos, sin), image_size)
        todo = todo[~masks[todo].any(axis=(1, 2))]
        if not todo.size:
            return masks
    raise RuntimeError(f"could not rasterise a non-empty shape for labels {labels[todo]}")  # pragma: no cover


def _distractor_shapes(
    kind: int, p: np.ndarray, s: float, centres: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Row intervals (left, right) of m distractors of one kind with parameters p [m, 10], and
    their opacity at pixel (x, y) as fade_y[y] - fade_x[x]; all [m, image_size], centres being
    the pixel centres."""
    alpha = 0.1 + 0.2 * p[:, 1:2]
    fade_y, fade_x = np.repeat(alpha, len(centres), axis=1), np.zeros((len(p), len(centres)))
    if kind == 0:  # soft blob with quadratic fall-off (no hard edge, unlike the circle)
        cx, cy, rad = s * p[:, 5], s * p[:, 6], (0.1 + 0.2 * p[:, 7]) * s
        left, right = _disk_rows(centres, cx, cy, rad)
        fade_y = alpha * (1.0 - ((centres - cy[:, None]) / rad[:, None]) ** 2)
        fade_x = alpha * ((centres - cx[:, None]) / rad[:, None]) ** 2
    elif kind == 1:  # thin line segment: a long, thin rotated rectangle
        x0, y0, x1, y1 = (s * p[:, 5 + k] for k in range(4))
        half_width = (0.4 + 0.5 * p[:, 9]) * s / 32.0
        length = np.maximum(np.sqrt((x1 - x0) ** 2 + (y1 - y0) ** 2), 1e-9)
        nx, ny = (y0 - y1) / length * half_width, (x1 - x0) / length * half_width
        px = np.stack([x0 + nx, x1 + nx, x1 - nx, x0 - nx], axis=1)
        py = np.stack([y0 + ny, y1 + ny, y1 - ny, y0 - ny], axis=1)
        left, right = _convex_rows(centres, px, py)
    else:  # small axis-aligned rectangle
        x0, y0 = s * p[:, 5], s * p[:, 6]
        x1, y1 = x0 + (0.04 + 0.12 * p[:, 7]) * s, y0 + (0.04 + 0.12 * p[:, 8]) * s
        rows = (centres >= y0[:, None]) & (centres < y1[:, None])
        left, right = np.where(rows, x0[:, None], np.inf), np.where(rows, x1[:, None], -np.inf)
    return left, right, fade_y, fade_x


def _add_distractors(img: np.ndarray, u: np.ndarray) -> None:
    """Composite each image's distractors, in order, into img (float32 [n, 3, H, W])."""
    n, image_size = len(img), img.shape[-1]
    s, c, plane = float(image_size), _pixel_centres(image_size), image_size * image_size
    count = 2 + np.floor(4.0 * u[:, _SLOT["n_distractors"].start])
    params = u[:, _SLOT["distractors"]].reshape(n, _MAX_DISTRACTORS, _DISTRACTOR_PARAMS)
    flat = img.reshape(-1)
    for k in range(_MAX_DISTRACTORS):  # one distractor per image at a time, so in order
        images = np.flatnonzero(count > k)
        p = params[images, k]
        kind = np.floor(3.0 * p[:, 0])
        left, right, fade_y, fade_x = np.empty((4, len(images), image_size))
        for kind_id in range(3):
            sel = np.flatnonzero(kind == kind_id)
            left[sel], right[sel], fade_y[sel], fade_x[sel] = _distractor_shapes(kind_id, p[sel], s, c)
        row, column = _row_pixels(left, right, image_size)
        obj = np.repeat(np.arange(len(images)), image_size)[row]
        opacity = np.maximum(fade_y.reshape(-1)[row] - fade_x.reshape(-1)[obj * image_size + column], 0.0)
        opacity = opacity.astype(np.float32)  # the image's precision, so no casts per channel
        colours = np.ascontiguousarray((255.0 * p[:, 2:5]).T, dtype=np.float32)
        index = _row_starts(images, image_size, 3)[row] + column
        for colour in colours:
            before = np.take(flat, index)
            flat[index] = before + opacity * (colour[obj] - before)
            index += plane


def _background(u: np.ndarray, noise_words: np.ndarray, image_size: int) -> np.ndarray:
    """Cluttered uint8 backgrounds, channels first [n, 3, H, W]: colour gradient, pixel noise,
    faint distractors."""
    s, c = float(image_size), _pixel_centres(image_size)

    # Random linear gradient between two related, muted and darkish colours (a grey level plus
    # a tint). Shapes are bright (see _pick_colours), so figure and ground differ in kind, as in
    # a photo of an object, and a small transformer learns the task in minutes on a CPU. Both
    # colours stay _NOISE away from 0 and 255, so that no value, with noise and distractors
    # (convex combinations of colours), leaves [0, 255] and nothing needs clipping.
    grey = 15.0 + 85.0 * u[:, _SLOT["grey"]]
    c0 = np.clip(grey + (60.0 * u[:, _SLOT["tint"]] - 30.0), _NOISE, 255 - _NOISE)
    c1 = np.clip(c0 + (80.0 * u[:, _SLOT["delta"]] - 40.0), _NOISE, 255 - _NOISE)
    dx, dy = _cos_sin(2.0 * math.pi * u[:, _SLOT["gradient_angle"].start])
    # The position t = proj / (s sqrt 2) + 1/2 along the gradient stays in [0, 1] without
    # clipping, so the colour c0 + (c1 - c0) t is the sum of a per-column and a per-row term:
    # the image is a single broadcast addition.
    k = 1.0 / (s * math.sqrt(2.0))
    start, step = c0[:, :, None], (c1 - c0)[:, :, None]
    columns = start + step * (0.5 + (c - s / 2) * (dx * k)[:, None, None])
    rows = step * ((c - s / 2) * (dy * k)[:, None, None])
    img = columns.astype(np.float32)[:, :, None, :] + rows.astype(np.float32)[:, :, :, None]

    # Bytes of the noise words in little-endian order, the same on any machine.
    octets = np.ascontiguousarray(noise_words, dtype="<u8").view(np.uint8)[:, : img[0].size]
    img += ((octets & 3).view(np.int8) - (octets >> 6).view(np.int8)).reshape(img.shape)
    _add_distractors(img, u)
    return np.rint(img, out=img).astype(np.uint8)


def _pick_colours(
    u: np.ndarray, covered: list[np.ndarray], owner: np.ndarray, starts: np.ndarray
) -> np.ndarray:
    """Random bright shape colour per image, uint8 [n, 3] (one random channel >= 200), far from
    every background pixel it covers (covered: R, G, B of those pixels, of image owner, the
    pixels of image i from starts[i]): the first of the candidates that is, else the farthest."""
    n = len(u)
    candidates = np.floor(256.0 * u[:, _SLOT["candidates"]]).astype(np.int32).reshape(n, -1, 3)
    channel = np.floor(3.0 * u[:, _SLOT["bright_channel"].start]).astype(np.intp)
    candidates[np.arange(n), :, channel] = 200 + np.floor(56.0 * u[:, _SLOT["bright"]]).astype(np.int32)
    # Squared distances are exact integers. The first candidate nearly always passes, so the
    # others are scored, image by image, only where it does not.
    d2 = sum((covered[ch] - candidates[:, 0, ch][owner]) ** 2 for ch in range(3))
    colours = candidates[:, 0].copy()
    ends = np.r_[starts[1:], len(owner)]
    for i in np.flatnonzero(np.minimum.reduceat(d2, starts) < _MIN_CONTRAST**2):
        pixels = slice(starts[i], ends[i])
        nearest = sum((covered[ch][pixels, None] - candidates[i, :, ch]) ** 2 for ch in range(3)).min(axis=0)
        ok = np.flatnonzero(nearest >= _MIN_CONTRAST**2)
        colours[i] = candidates[i, ok[0] if ok.size else int(np.argmax(nearest))]
    return colours.astype(np.uint8)


def _render_words(
    words: np.ndarray, labels: np.ndarray, image_size: int, scale: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render images from their blocks of raw draws [n, _words_per_image], channels first;
    returns (images uint8 [n, 3, H, W], masks bool [n, H, W], backgrounds uint8 [n, 3, H, W])."""
    n, plane = len(words), image_size * image_size
    # The top 53 bits of a raw draw as a float in [0, 1), exactly as numpy's Generator.random.
    u = (words[:, :_N_UNIFORMS] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    background = _background(u, words[:, _N_UNIFORMS:], image_size)
    masks = _place_shapes(u, labels, image_size, scale)
    pixel = np.flatnonzero(masks)  # the shape pixels, image by image
    starts = np.searchsorted(pixel, np.arange(n) * plane)
    owner = np.repeat(np.arange(n), np.diff(np.r_[starts, pixel.size]))
    index = pixel + owner * (2 * plane)  # the pixel's red value in [n, 3, H, W]
    flat = background.reshape(-1)
    colours = _pick_colours(u, [flat[index + ch * plane].astype(np.int32) for ch in range(3)], owner, starts)
    images = background.copy()
    for ch in range(3):
        images.reshape(-1)[index + ch * plane] = colours[owner, ch]
    return images, masks, background


def _draw_words(seed: int, split_id: int, indices: np.ndarray, image_size: int) -> np.ndarray:
    """Blocks of raw draws [n, _words_per_image] of the given images of a split's stream."""
    k = _words_per_image(image_size)
    sequence = np.random.SeedSequence([seed, split_id])
    unique, inverse = np.unique(indices, return_inverse=True)
    words = np.empty((len(unique), k), dtype=np.uint64)
    # Consecutive indices are one stretch of the stream: one jump ahead and one draw per run.
    breaks = np.flatnonzero(np.diff(unique) != 1) + 1
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(unique)], strict=True):
        stream = np.random.PCG64(sequence).advance(int(unique[start]) * k)
        words[start:stop] = stream.random_raw((stop - start) * k).reshape(-1, k)
    return words[inverse.reshape(-1)]


def _check_image_size(image_size: int) -> None:
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")


def _check_num_classes(num_classes: int) -> None:
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in [2, {len(CLASS_NAMES)}], got {num_classes}")


def render_batch(
    seed: int,
    split_id: int,
    indices: Sequence[int] | np.ndarray,
    image_size: int,
    num_classes: int,
    scale: Sequence[float] = DEFAULT_SCALE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples ``indices`` of split ``split_id``: (images uint8 [n, H, W, 3], labels int64 [n],
    bool masks [n, H, W]). Label ``i % num_classes``, so every class count differs by at most 1.

    Each image depends only on (seed, split_id, index, image_size, num_classes, scale), not on
    the other indices of the call or their order. ``scale``: range of the shape's diameter as a
    fraction of the image side. Each mask is exactly the set of pixels painted with the image's
    (single) shape colour.
    """
    _check_image_size(image_size)
    _check_num_classes(num_classes)
    scale = _check_scale(scale)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if seed < 0 or split_id < 0 or (indices < 0).any():
        raise ValueError(
            f"seed, split_id and indices must be >= 0, got {seed}, {split_id} and {indices.min(initial=0)}"
        )
    n = len(indices)
    labels = indices % num_classes
    # Rendered channels first (fast array arithmetic) and returned as a [n, H, W, 3] view of
    # that buffer, so that the permute back to [n, 3, H, W] for torch copies nothing.
    images = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    masks = np.empty((n, image_size, image_size), dtype=bool)
    batch = max(1, _BATCH_PIXELS // (image_size * image_size))
    for start in range(0, n, batch):
        part = slice(start, start + batch)
        words = _draw_words(seed, split_id, indices[part], image_size)
        images[part], masks[part], _ = _render_words(words, labels[part], image_size, scale)
    return images.transpose(0, 2, 3, 1), labels, masks


def render_shape_image(
    rng: np.random.Generator, label: int, image_size: int, scale: Sequence[float] = DEFAULT_SCALE
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image of class ``label`` from ``rng``'s next raw draws; returns (uint8 HxWx3
    image, bool HxW mask).

    ``scale``: range of the shape's diameter as a fraction of the image side. The mask is
    exactly the set of pixels painted with the (single) shape colour.
    """
    if not 0 <= label < len(CLASS_NAMES):
        raise ValueError(f"label must be in [0, {len(CLASS_NAMES) - 1}], got {label}")
    _check_image_size(image_size)
    words = rng.bit_generator.random_raw(_words_per_image(image_size)).reshape(1, -1)
    images, masks, _ = _render_words(words, np.array([label]), image_size, _check_scale(scale))
    return images[0].transpose(1, 2, 0), masks[0]


class ShapesDataset(Dataset):
    """Deterministic procedural dataset of geometric shapes on cluttered backgrounds.

    ``shape_scale``: range of a shape's diameter as a fraction of the image side; each shape
    is placed uniformly wherever it fits.

    ``__getitem__`` returns ``(image, label)`` (or ``(image, label, mask)`` with
    ``return_mask=True``), where ``image`` is float32 [3, H, W] in [0, 1]. The whole split is
    generated once, on first access, and cached in memory.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 10000,
        image_size: int = 32,
        num_classes: int = 10,
        seed: int = 0,
        return_mask: bool = False,
        transform: Callable | None = None,
        shape_scale: tuple[float, float] = DEFAULT_SCALE,
    ) -> None:
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {tuple(SPLIT_IDS)}, got {split!r}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        _check_image_size(image_size)
        _check_num_classes(num_classes)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.shape_scale = _check_scale(shape_scale)
        self.split = split
        self.size = int(size)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.return_mask = return_mask
        self.transform = transform
        self.classes: tuple[str, ...] = CLASS_NAMES[: self.num_classes]
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def label_of(self, index: int) -> int:
        """Class of sample ``index``: round-robin, so every class count differs by at most 1."""
        return index % self.num_classes

    def _render_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return render_batch(
            self.seed, SPLIT_IDS[self.split], indices, self.image_size, self.num_classes, self.shape_scale
        )

    def render(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        """Generate sample ``index`` from scratch: (uint8 HxWx3 image, label, bool HxW mask)."""
        self._check_index(index)
        images, labels, masks = self._render_batch(np.array([index]))
        return images[0], int(labels[0]), masks[0]

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Whole split as (images uint8 [N,3,H,W], labels int64 [N], masks bool [N,H,W]).

        Cached after the first call so epochs (and forked DataLoader workers, if called before
        they start) reuse the same tensors.
        """
        if self._cache is None:
            images, labels, masks = self._render_batch(np.arange(self.size))
            self._cache = (
                torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                torch.from_numpy(labels),
                torch.from_numpy(masks),
            )
        return self._cache

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for ShapesDataset of size {self.size}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor]:
        index = int(index)
        self._check_index(index)
        images, labels, masks = self.materialize()
        image = images[index].float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        label = int(labels[index])
        if self.return_mask:
            return image, label, masks[index]
        return image, label


# ---------------------------------------------------------------------------------------------
# the data module: splits generated once and cached on disk


class ShapesDataModule(ImageDataModule):
    """The built-in shapes dataset: each split generated once (vectorised over images) and
    cached on disk under ``cache_dir``, keyed by its settings and the generator's version;
    flips and translations of training batches run on the device."""

    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(
        self,
        image_size: int = 48,
        num_classes: int = 10,
        train_size: int = 24000,
        val_size: int = 2000,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        augment: bool = True,
        shape_scale: Tuple[float, float] = (0.4, 0.7),
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        # fail at construction, not in setup, on impossible arguments
        ShapesDataset("val", size=1, image_size=image_size, num_classes=num_classes, shape_scale=shape_scale)
        self._cache_unwritable = False
        # splits generated by this process (prepare_data), so that setup does not read them back
        self._generated: Dict[Tuple[str, int], Tuple[Tensor, Tensor, Tensor]] = {}

    def train_batch(self, images: Tensor, keys: Tensor) -> Tensor:
        if self.hparams.augment:
            # RandomHorizontalFlip + RandomCrop(size, padding=size // 8, reflect), per image
            pad = self.hparams.image_size // 8
            u = key_uniform(keys, stream=1, count=3)
            shifts = (u[:, 1:] * (2 * pad + 1)).to(torch.int64).clamp(max=2 * pad) - pad
            images = flip_and_translate(images, u[:, 0] < 0.5, shifts[:, 0], shifts[:, 1])
        return self.normalize(images)

    # -- the on-disk cache

    def _settings(self, split: str, size: int) -> Dict[str, Any]:
        hp = self.hparams
        return {
            "generator_version": GENERATOR_VERSION,
            "split": split,
            "size": int(size),
            "image_size": int(hp.image_size),
            "num_classes": int(hp.num_classes),
            "seed": int(hp.seed),
            "shape_scale": [float(v) for v in hp.shape_scale],
        }

    def cache_path(self, split: str, size: int) -> Optional[Path]:
        """Where the split with these settings is cached (None: no cache_dir)."""
        if not self.hparams.cache_dir:
            return None
        settings = self._settings(split, size)
        digest = hashlib.blake2b(repr(sorted(settings.items())).encode(), digest_size=6).hexdigest()
        return (
            Path(str(self.hparams.cache_dir)).expanduser()
            / f"shapes-{split}-v{GENERATOR_VERSION}-{digest}.pt"
        )

    def _read_cache(self, path: Path, settings: Dict[str, Any]) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(content, dict) or content.get("settings") != settings:
                saved = content.get("settings") if isinstance(content, dict) else None
                log.warning(
                    "ignoring the shapes cache %s: it was written for other settings (%s), not this "
                    "run's; delete it and it is rebuilt", path, saved,
                )  # fmt: skip
                return None
            images, labels, masks = content["images"], content["labels"], content["masks"]
        except Exception as err:  # a truncated or foreign file: torch raises many types
            log.warning(
                "ignoring the shapes cache %s: unreadable (%s: %s); delete it and it is rebuilt",
                path, type(err).__name__, str(err).splitlines()[0] if str(err) else "",
            )  # fmt: skip
            return None
        n, s = settings["size"], settings["image_size"]
        if images.shape != (n, 3, s, s) or images.dtype != torch.uint8 or labels.shape != (n,):
            log.warning("ignoring the shapes cache %s: its arrays have the wrong shape; delete it", path)
            return None
        return images, labels, masks

    def _write_cache(
        self, path: Path, settings: Dict[str, Any], arrays: Tuple[Tensor, Tensor, Tensor]
    ) -> None:
        images, labels, masks = arrays
        content = {"settings": settings, "images": images, "labels": labels, "masks": masks}
        try:
            atomic_write(path, lambda handle: torch.save(content, handle))
        except OSError as err:
            self._cache_unwritable = True
            log.warning(
                "cannot write the shapes cache (%s); keeping the images in memory only: set "
                "data.cache_dir to a writable folder (or null) to silence this", err,
            )  # fmt: skip

    def _split(self, split: str, size: int, write: bool) -> InMemoryImages:
        if (split, size) in self._generated:
            return InMemoryImages(*self._generated[(split, size)])
        hp = self.hparams
        dataset = ShapesDataset(
            split,
            size=size,
            image_size=hp.image_size,
            num_classes=hp.num_classes,
            seed=hp.seed,
            shape_scale=hp.shape_scale,
        )
        path, settings = self.cache_path(split, size), self._settings(split, size)
        arrays = self._read_cache(path, settings) if path is not None and path.is_file() else None
        if arrays is None:
            arrays = dataset.materialize()
            if write and path is not None and not path.exists() and not self._cache_unwritable:
                self._write_cache(path, settings, arrays)
            self._generated[(split, size)] = arrays
        return InMemoryImages(*arrays)

    def _splits(self, stage: Optional[str]) -> List[Tuple[str, int]]:
        splits = [("val", self.hparams.val_size)]
        if stage in (None, "fit"):
            splits.insert(0, ("train", self.hparams.train_size))
        return splits

    def prepare_data(self) -> None:
        # one process per node generates and writes the cache; the others read it in setup
        # (Lightning runs prepare_data on local rank 0 and holds the other ranks at a barrier)
        for split, size in self._splits(None):
            path = self.cache_path(split, size)
            if path is not None and not path.exists() and not self._cache_unwritable:
                self._split(split, size, write=True)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._split("train", self.hparams.train_size, write=False)
        if self.val_set is None:
            self.val_set = self._split("val", self.hparams.val_size, write=False)

    def train_images_for_eval(self) -> Dataset:
        if self.train_set is None:
            self.setup("fit")
        return self.train_set
