"""Per-image decode + crop + resize to uint8, for a fast ImageNet input pipeline.

Workers hand ``uint8`` (3, H, W) images to the device; normalisation, flips and the cast to float
happen there (elsewhere), so a worker does no float work and a batch is a quarter of the bytes
of a float32 one.

Why these functions rather than ``T.RandomResizedCrop`` + ``ToTensor`` + ``Normalize``:

* one PIL ``resize((s, s), box=...)`` crops and resizes (antialiased) in a single pass from the
  decoded image, with no intermediate cropped copy and no float tensors;
* for JPEGs whose crop is at least twice the output size in both directions, ``Image.draft`` asks
  libjpeg for a 1/2, 1/4 or 1/8 scaled DCT decode, which skips most of the IDCT and colour
  conversion work; the crop box is scaled by the factor actually applied. On typical ImageNet
  photos (~500x375) a 224 crop rarely qualifies, so the gain there comes from the first point;
  large photos gain a lot from it;
* ``decode_resized_crops`` is the same crop + resize for a GPU path: bytes are read in workers
  (``read_jpeg_with_box``) and a whole batch is decoded with nvjpeg in one call.

A box is ``(left, top, width, height)`` in full-resolution pixel coordinates, for every box
function here (``random_resized_crop_box``, ``center_crop_box``), so ``load_crop`` and
``decode_resized_crops`` take either.

EXIF orientation is not applied, as with torchvision's ``ImageFolder`` default loader.

``torchvision.io.decode_jpeg`` is deprecated since torchvision 0.29 in favour of TorchCodec
(not installed here); it still works and warns (DeprecationWarning) on each call.

Measured 2026-12 on a 2-core CPU box shared with other work (so +-10 %), one process,
``torch.set_num_threads(1)`` as in a DataLoader worker, photo-like JPEGs (sines + noise, quality
90) written with PIL 13.0 (libjpeg-turbo 6.2 API), the same files and per-image
``torch.manual_seed(i)`` for both sides (hence identical train crops), median of 3 runs, images/s:

                                                        200 x 500x375   40 x 2000x1500
    train  T.RandomResizedCrop(224)+Flip+ToTensor+Normalize    83              16
           load_crop(random_resized_crop_box, 224)            123              32
    eval   T.Resize(256)+CenterCrop(224)+ToTensor+Normalize    99              15
           load_crop(center_crop_box(size=224, resize=256))   161              38
           read_jpeg_with_box + decode_resized_crops, cpu     232              26

(script: the measurement in the report that came with this module; the torchvision lines are
transforms v1 on ``Image.open(p).convert("RGB")``.) On 500x375 the decode and PIL's bilinear
resize cost about the same here (~2.5 ms and ~2 ms). The draft decode is what doubles the large
photos: a separate run of load_crop on them gave 44 train / 50 eval images/s with it and 24 / 23
with ``_draft_request`` patched to None (the box is shared, so the load differs between runs).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from os import PathLike
from typing import IO, Union

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

Box = tuple[float, float, float, float]  # (left, top, width, height) in full-resolution pixels
BoxFn = Callable[[int, int], Box]  # (width, height) -> box
PathOrFile = Union[str, PathLike, IO[bytes]]


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Sample a RandomResizedCrop box ``(left, top, crop_w, crop_h)``.

    Same algorithm and the same sequence of torch draws as torchvision's
    ``RandomResizedCrop.get_params``, so with the same torch seed both give the same box.
    """
    area = width * height
    # log of the ratios in float32, then draws and exp in float32 tensors, as torchvision does:
    # a float64 path would very occasionally round a side the other way.
    log_lo, log_hi = torch.log(torch.tensor(ratio)).tolist()
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.empty(1).uniform_(log_lo, log_hi, generator=generator).exp_().item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return left, top, w, h

    # No sample fitted: the largest centred crop whose aspect ratio is inside the range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, size: int, resize: int) -> Box:
    """The box, in original pixels, that ``Resize(resize)`` then ``CenterCrop(size)`` keeps.

    Same rounding as torchvision (long side truncated, crop offset rounded), so resizing this box
    straight to ``size`` x ``size`` samples the same region in one resampling step.
    """
    if size > resize:
        raise ValueError(f"crop size {size} is larger than the resized short side {resize}")
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, size * sx, size * sy


def _draft_request(
    width: int, height: int, crop_w: float, crop_h: float, size: int
) -> tuple[int, int] | None:
    """The size to pass to ``Image.draft`` for the largest DCT reduction (8, 4 or 2) that still
    leaves the crop at least ``size`` pixels in both directions; None when none does."""
    for s in (8, 4, 2):
        if crop_w >= s * size and crop_h >= s * size:
            request = (width // s, height // s)
            # PIL applies the largest of 8/4/2/1 not above min(width // request_w, ...), which
            # is s itself unless a side is under s * s pixels (tiny outputs).
            if min(width // request[0], height // request[1]) < 2 * s:
                return request
    return None


def _to_chw_tensor(img: Image.Image) -> torch.Tensor:
    # np.asarray makes the one unavoidable copy out of PIL (read-only); the transpose to CHW
    # is the second and gives a writable array torch can wrap without another copy.
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)))


def load_crop(
    path_or_file: PathOrFile,
    box_fn: BoxFn,
    size: int,
    resample: int = Image.BILINEAR,
) -> torch.Tensor:
    """Decode an image, crop ``box_fn(width, height)`` and resize it to uint8 (3, size, size).

    JPEGs whose crop is at least twice ``size`` each way are decoded at a reduced DCT scale.
    PIL errors (corrupt or truncated files) propagate.
    """
    with Image.open(path_or_file) as img:  # reads the header only
        width, height = img.size
        left, top, crop_w, crop_h = box_fn(width, height)
        factor = 1.0
        if img.format == "JPEG":
            request = _draft_request(width, height, crop_w, crop_h, size)
            drafted = img.draft("RGB", request) if request else None
            if drafted is not None:  # the box it returns is the full image in decoded pixels
                factor = width / drafted[1][2]
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        box = (left / factor, top / factor, (left + crop_w) / factor, (top + crop_h) / factor)
        out = rgb.resize((size, size), resample, box=box)
    return _to_chw_tensor(out)


def read_jpeg_with_box(path: PathOrFile, box_fn: BoxFn) -> tuple[torch.Tensor, Box]:
    """Read a JPEG's bytes as a uint8 1-D tensor, with ``box_fn`` applied to its header size.

    For the device-decode path: workers only read, ``decode_resized_crops`` decodes on the GPU.
    Raises ``ValueError`` for a file that is not a JPEG (ImageNet has a few PNGs named .JPEG),
    so the caller can fall back to ``load_crop``.
    """
    if hasattr(path, "read"):
        data = np.frombuffer(path.read(), dtype=np.uint8).copy()  # writable, for torch
    else:
        data = np.fromfile(path, dtype=np.uint8)
    with Image.open(io.BytesIO(data)) as img:  # header only, from the bytes already read
        if img.format != "JPEG":
            raise ValueError(f"{path}: not a JPEG ({img.format})")
        width, height = img.size
    return torch.from_numpy(data), box_fn(width, height)


def _pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    # Tensor slicing needs whole pixels: round the edges (center_crop_box gives fractional
    # ones; the shift is under half an original pixel) and keep at least one pixel inside.
    left, top, w, h = box
    x0 = min(max(int(round(left)), 0), width - 1)
    y0 = min(max(int(round(top)), 0), height - 1)
    x1 = min(max(int(round(left + w)), x0 + 1), width)
    y1 = min(max(int(round(top + h)), y0 + 1), height)
    return x0, y0, x1, y1


def decode_resized_crops(
    data: list[torch.Tensor],
    boxes: Sequence[Box],
    size: int,
    device: torch.device | str,
) -> torch.Tensor:
    """Decode a batch of JPEG byte tensors on ``device``, crop each box, resize to (B, 3, size, size).

    One ``decode_jpeg`` call for the whole list (batched nvjpeg on CUDA; a loop on CPU). Returns
    uint8. Boxes are ``(left, top, width, height)`` in full-resolution pixels, rounded to whole
    pixels here.
    """
    if len(data) != len(boxes):
        raise ValueError(f"{len(data)} images but {len(boxes)} boxes")
    device = torch.device(device)
    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=device)
    # A loop, not one batched op: the decoded images all differ in size, and padding them to a
    # common size (then e.g. roi_align) could need huge memory when one photo is large. Each
    # crop is a view; only the size x size result is written.
    for k, (img, box) in enumerate(zip(images, boxes, strict=True)):
        x0, y0, x1, y1 = _pixel_box(box, img.shape[-1], img.shape[-2])
        out[k] = TF.resize(
            img[:, y0:y1, x0:x1], [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True
        )
    return out
