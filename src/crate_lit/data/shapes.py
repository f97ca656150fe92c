"""Procedural "shapes" image classification dataset.

Every image shows exactly one geometric shape (the class) drawn with hard edges on top of a
cluttered background. Nothing is downloaded: image ``i`` of a split is generated from a numpy
generator seeded only by ``(seed, split, i)``, so it is identical on every machine, in every
process and regardless of access order. Because the shape is painted last with a single flat
colour, the ground-truth foreground mask is exact, which makes the dataset useful for checking
whether attention maps segment the object.

Only IEEE-exact array arithmetic (``+ - * /``, ``sqrt``, comparisons) is applied to pixel
arrays; trigonometry is evaluated on Python scalars. Vectorised transcendental functions
(``np.exp``, ``np.sin``...) may differ in the last bit between CPUs, which could flip a pixel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_SCALE",
    "MIN_IMAGE_SIZE",
    "SPLIT_IDS",
    "ShapesDataset",
    "render_shape_image",
]

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

# Default range of the shape diameter as a fraction of the image side.
DEFAULT_SCALE: tuple[float, float] = (0.5, 0.9)
# Minimum RGB (0..255) Euclidean distance between the shape colour and every background pixel
# it covers; keeps the shape visible against the local background.
_MIN_CONTRAST = 90.0
_COLOUR_CANDIDATES = 32
_NOISE = 3  # uniform integer pixel noise amplitude
_HEART_D = 0.79  # heart half-diagonal; outermost point ends up at radius ~0.997


def _regular_polygon(n: int, start: float = math.pi / 2) -> np.ndarray:
    """Vertices of a regular n-gon with circumradius 1 (unit disk), as an [n, 2] array."""
    angles = [start + 2.0 * math.pi * k / n for k in range(n)]
    return np.array([(math.cos(a), math.sin(a)) for a in angles])


def _star_polygon(points: int = 5, inner: float = 0.42) -> np.ndarray:
    angles = [math.pi / 2 + math.pi * k / points for k in range(2 * points)]
    radii = [1.0 if k % 2 == 0 else inner for k in range(2 * points)]
    return np.array([(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles, strict=True)])


def _normalised(vertices: list[tuple[float, float]]) -> np.ndarray:
    """Centre a polygon on its bounding-box centre and scale it into the unit disk."""
    v = np.asarray(vertices, dtype=np.float64)
    v = v - (v.min(axis=0) + v.max(axis=0)) / 2.0
    return v / np.sqrt((v**2).sum(axis=1)).max()


# All shapes live in the unit disk of their local frame, so a centre at least one radius away
# from every border guarantees the shape is fully inside the image.
_POLYGONS: dict[str, np.ndarray] = {
    "square": _regular_polygon(4, math.pi / 4),
    "triangle": _regular_polygon(3),
    "pentagon": _regular_polygon(5),
    "hexagon": _regular_polygon(6),
    "star": _star_polygon(),
    "cross": _normalised(
        [
            (-0.3, -1),
            (0.3, -1),
            (0.3, -0.3),
            (1, -0.3),
            (1, 0.3),
            (0.3, 0.3),
            (0.3, 1),
            (-0.3, 1),
            (-0.3, 0.3),
            (-1, 0.3),
            (-1, -0.3),
            (-0.3, -0.3),
        ]
    ),
    "arrow": _normalised(
        [(-1, -0.2), (0.15, -0.2), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.2), (-1, 0.2)]
    ),
    "l_shape": _normalised([(0, 0), (1, 0), (1, 0.4), (0.4, 0.4), (0.4, 1.3), (0, 1.3)]),
}


# Edge endpoints (x1, y1, x2, y2) per polygon, precomputed once.
_POLYGON_EDGES: dict[str, tuple[np.ndarray, ...]] = {
    name: (v[:, 0], v[:, 1], np.roll(v[:, 0], -1), np.roll(v[:, 1], -1)) for name, v in _POLYGONS.items()
}


def _in_polygon(u: np.ndarray, v: np.ndarray, edges: tuple[np.ndarray, ...]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points and edges at once."""
    x1, y1, x2, y2 = edges
    pu, pv = u[..., None], v[..., None]
    straddles = (y1 > pv) != (y2 > pv)
    dy = np.where(y2 == y1, 1.0, y2 - y1)  # horizontal edges never straddle; avoid 0/0
    x_cross = x1 + (pv - y1) * (x2 - x1) / dy
    return (np.count_nonzero(straddles & (pu < x_cross), axis=-1) & 1).astype(bool)


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership test for shape ``name`` at local coordinates (u, v) in the unit disk."""
    if name in _POLYGONS:
        return _in_polygon(u, v, _POLYGON_EDGES[name])
    r2 = u * u + v * v
    if name == "circle":
        return r2 <= 1.0
    if name == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if name == "crescent":
        return (r2 <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.8**2)
    if name == "heart":
        # A square standing on its corner plus two disks on its upper sides: the deep notch
        # keeps it distinct from a circle/triangle even at 32 px. Shifted to fit the unit disk.
        d = _HEART_D
        y = v + 0.26 * d
        lobes = (np.abs(u) - d / 2) ** 2 + (y - d / 2) ** 2 <= d * d / 2
        return (np.abs(u) + np.abs(y) <= d) | lobes
    raise KeyError(name)


@lru_cache(maxsize=16)
def _pixel_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel centres, so the rasterisation is symmetric and independent of image_size.
    c = np.arange(image_size, dtype=np.float64) + 0.5
    ys, xs = np.meshgrid(c, c, indexing="ij")
    ys.setflags(write=False)
    xs.setflags(write=False)
    return xs, ys


def _render_background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Cluttered uint8 background: colour gradient, low-contrast distractors, pixel noise."""
    s = float(image_size)
    xs, ys = _pixel_grid(image_size)

    # Random linear gradient between two related, muted and darkish colours (a grey level plus
    # a tint). Shapes are bright (see _pick_colour), so figure and ground differ in kind, as in
    # a photo of an object, and a small transformer learns the task in minutes on a CPU.
    c0 = np.clip(rng.uniform(15.0, 100.0) + rng.uniform(-30.0, 30.0, size=3), 0.0, 255.0)
    c1 = np.clip(c0 + rng.uniform(-40.0, 40.0, size=3), 0.0, 255.0)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    dx, dy = math.cos(theta), math.sin(theta)
    proj = (xs - s / 2) * dx + (ys - s / 2) * dy
    t = np.clip(proj / s + 0.5, 0.0, 1.0)[..., None]
    img = c0 + (c1 - c0) * t

    # Distractors are soft blobs, thin lines and small rectangles: none of them is a class
    # shape, and they are faint so the label stays unambiguous.
    for _ in range(int(rng.integers(2, 6))):
        kind = int(rng.integers(0, 3))
        alpha = rng.uniform(0.1, 0.3)
        colour = rng.uniform(0.0, 255.0, size=3)
        if kind == 0:  # soft blob with quadratic fall-off (no hard edge, unlike the circle)
            cx, cy = rng.uniform(0.0, s, size=2)
            rad = rng.uniform(0.1, 0.3) * s
            w = np.clip(1.0 - ((xs - cx) ** 2 + (ys - cy) ** 2) / (rad * rad), 0.0, 1.0)
        elif kind == 1:  # thin line segment
            x0, y0, x1, y1 = rng.uniform(0.0, s, size=4)
            half_width = rng.uniform(0.4, 0.9) * s / 32.0
            ex, ey = x1 - x0, y1 - y0
            length2 = max(ex * ex + ey * ey, 1e-9)
            tt = np.clip(((xs - x0) * ex + (ys - y0) * ey) / length2, 0.0, 1.0)
            d2 = (xs - x0 - tt * ex) ** 2 + (ys - y0 - tt * ey) ** 2
            w = (d2 <= half_width * half_width).astype(np.float64)
        else:  # small axis-aligned rectangle
            x0, y0 = rng.uniform(0.0, s, size=2)
            rw, rh = rng.uniform(0.04, 0.16, size=2) * s
            w = ((xs >= x0) & (xs < x0 + rw) & (ys >= y0) & (ys < y0 + rh)).astype(np.float64)
        a = (alpha * w)[..., None]
        img = img * (1.0 - a) + colour * a

    out = np.clip(np.rint(img), 0, 255).astype(np.int16)
    # Integer noise is exactly reproducible (no float rounding); added before the shape is drawn
    # so that every shape pixel keeps exactly the shape colour.
    out += rng.integers(-_NOISE, _NOISE + 1, size=out.shape, dtype=np.int16)
    return np.clip(out, 0, 255).astype(np.uint8)


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


def _shape_pose_mask(
    rng: np.random.Generator, name: str, image_size: int, scale: tuple[float, float] = DEFAULT_SCALE
) -> np.ndarray:
    """Rasterise shape ``name`` with random scale, rotation and position; returns a bool mask."""
    s = float(image_size)
    xs, ys = _pixel_grid(image_size)
    for _ in range(16):
        radius = rng.uniform(scale[0], scale[1]) * s / 2.0
        cx, cy = rng.uniform(radius, s - radius, size=2)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        ca, sa = math.cos(angle), math.sin(angle)
        # Only pixels whose centre lies in the bounding box of the unit disk can be inside.
        x0, x1 = max(0, math.floor(cx - radius)), min(image_size, math.ceil(cx + radius) + 1)
        y0, y1 = max(0, math.floor(cy - radius)), min(image_size, math.ceil(cy + radius) + 1)
        dx = xs[y0:y1, x0:x1] - cx
        dy = ys[y0:y1, x0:x1] - cy
        # Inverse rotation maps image coordinates into the shape's local frame; image y points
        # down, so the shape is flipped vertically, which is fine under random rotation.
        u = (ca * dx + sa * dy) / radius
        v = (ca * dy - sa * dx) / radius
        mask = np.zeros((image_size, image_size), dtype=bool)
        mask[y0:y1, x0:x1] = _shape_mask(name, u, v)
        if mask.any():
            return mask
    raise RuntimeError(f"could not rasterise a non-empty {name!r}")  # pragma: no cover


def _pick_colour(rng: np.random.Generator, covered: np.ndarray) -> np.ndarray:
    """Random bright shape colour (one random channel >= 200) far from every background pixel
    it will cover."""
    candidates = rng.integers(0, 256, size=(_COLOUR_CANDIDATES, 3)).astype(np.float64)
    candidates[:, int(rng.integers(0, 3))] = rng.integers(200, 256, size=_COLOUR_CANDIDATES)
    covered = covered.astype(np.float64)
    best, best_d2 = candidates[0], -1.0
    # Taking the first acceptable candidate keeps colours varied; chunks avoid scoring all
    # candidates when an early one already passes (the usual case).
    for start in range(0, _COLOUR_CANDIDATES, 8):
        chunk = candidates[start : start + 8]
        diff = chunk[:, None, :] - covered[None, :, :]
        min_d2 = (diff * diff).sum(axis=-1).min(axis=1)
        ok = np.flatnonzero(min_d2 >= _MIN_CONTRAST**2)
        if ok.size:
            return chunk[ok[0]].astype(np.uint8)
        if min_d2.max() > best_d2:
            best, best_d2 = chunk[int(np.argmax(min_d2))], float(min_d2.max())
    return best.astype(np.uint8)


def _render(
    rng: np.random.Generator, label: int, image_size: int, scale: tuple[float, float] = DEFAULT_SCALE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one sample; returns (image HxWx3 uint8, mask HxW bool, background HxWx3 uint8)."""
    if not 0 <= label < len(CLASS_NAMES):
        raise ValueError(f"label must be in [0, {len(CLASS_NAMES) - 1}], got {label}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    scale = _check_scale(scale)
    background = _render_background(rng, image_size)
    mask = _shape_pose_mask(rng, CLASS_NAMES[label], image_size, scale)
    colour = _pick_colour(rng, background[mask])
    image = background.copy()
    image[mask] = colour
    return image, mask, background


def render_shape_image(
    rng: np.random.Generator, label: int, image_size: int, scale: tuple[float, float] = DEFAULT_SCALE
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image of class ``label``; returns (uint8 HxWx3 image, bool HxW mask).

    ``scale``: range of the shape's diameter as a fraction of the image side. The mask is
    exactly the set of pixels painted with the (single) shape colour.
    """
    image, mask, _ = _render(rng, label, image_size, scale)
    return image, mask


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
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
        if not 2 <= num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in [2, {len(CLASS_NAMES)}], got {num_classes}")
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

    def render(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        """Generate sample ``index`` from scratch: (uint8 HxWx3 image, label, bool HxW mask)."""
        self._check_index(index)
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], index])
        label = self.label_of(index)
        image, mask = render_shape_image(rng, label, self.image_size, self.shape_scale)
        return image, label, mask

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Whole split as (images uint8 [N,3,H,W], labels int64 [N], masks bool [N,H,W]).

        Cached after the first call so epochs (and forked DataLoader workers, if called before
        they start) reuse the same tensors.
        """
        if self._cache is None:
            n, h = self.size, self.image_size
            images = np.empty((n, h, h, 3), dtype=np.uint8)
            labels = np.empty(n, dtype=np.int64)
            masks = np.empty((n, h, h), dtype=bool)
            for i in range(n):
                images[i], labels[i], masks[i] = self.render(i)
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
