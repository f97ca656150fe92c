"""Per-image random numbers and the batched transforms drawn from them, on the device.

Each training image carries a 63-bit key (``loading.EpochSampler``). ``key_uniform`` turns the
keys into numbers with a counter-based hash, so an image's flip, crop or erased rectangle
depends on its key alone, not on the batch it falls in, the device or the DDP rank. The
transforms take uint8 or float images (B, C, H, W) and their per-image parameters, and do for
a whole batch in a few tensor operations what torchvision does image by image.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# per-image random numbers on the device

_MASK32 = 0xFFFF_FFFF


def _mul32(x: Tensor, constant: int) -> Tensor:
    """``x * constant mod 2**32`` for int64 tensors of 32-bit values, without int64 overflow
    (a full 32 x 32-bit product does not fit): the constant is split into 16-bit halves."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    # a 32-bit integer finaliser (xorshift-multiply rounds with well-mixing odd constants)
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def key_uniform(keys: Tensor, stream: int, count: int = 1) -> Tensor:
    """``count`` numbers in [0, 1) per image, float32 (B, count), from each image's int64 key.

    A pure function of (key, stream, position): the same on every device and for any batch
    composition. ``stream`` separates the draws of different transforms.
    """
    keys = keys.to(torch.int64)
    state = _mix32((keys & _MASK32) ^ _mix32((keys >> 32) ^ (stream * 0x9E37 + 0x632B)))
    counter = torch.arange(count, device=keys.device, dtype=torch.int64)
    bits = _mix32(state[:, None] ^ _mix32(counter + 0x3C6EF372 + stream))
    return (bits >> 8).to(torch.float32) / float(1 << 24)


# ---------------------------------------------------------------------------------------------
# batch transforms (uint8 or float images (B, C, H, W), parameters per image)


def flip_and_translate(images: Tensor, flip: Tensor, shift_y: Tensor, shift_x: Tensor) -> Tensor:
    """Horizontal flip where ``flip``, then a translation by (shift_y, shift_x) pixels with the
    border reflected: what RandomHorizontalFlip + RandomCrop(size, padding, "reflect") do to one
    image, for a whole batch in one gather."""
    b, c, h, w = images.shape

    def reflected(size: int, shift: Tensor) -> Tensor:
        index = torch.arange(size, device=images.device)[None, :] + shift[:, None].to(torch.int64)
        index = index.abs()  # reflect at 0 (the edge pixel itself is not repeated)
        return torch.where(index > size - 1, 2 * (size - 1) - index, index)

    rows = reflected(h, shift_y)
    cols = reflected(w, shift_x)
    cols = torch.where(flip[:, None], w - 1 - cols, cols)
    flat = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return images.reshape(b, c, h * w).gather(2, flat).view(b, c, h, w)


def random_erasing(
    images: Tensor,
    keys: Tensor,
    p: float,
    scale: Tuple[float, float] = (0.02, 0.33),
    ratio: Tuple[float, float] = (0.3, 3.3),
    attempts: int = 10,
) -> Tensor:
    """torchvision's RandomErasing (value 0 on normalised images) for a batch: with probability
    ``p`` an image gets one rectangle of ``scale`` of its area and aspect ``ratio`` zeroed; of
    ``attempts`` draws the first that fits is used, and none when none fits."""
    b, _, h, w = images.shape
    u = key_uniform(keys, stream=3, count=1 + 2 * attempts + 2 * attempts)
    erase = u[:, 0] < p
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[:, 1 : 1 + attempts])
    log_low, log_high = torch.log(torch.tensor(ratio, dtype=torch.float32, device=images.device))
    aspect = torch.exp(log_low + (log_high - log_low) * u[:, 1 + attempts : 1 + 2 * attempts])
    eh = torch.round(torch.sqrt(area * aspect)).to(torch.int64)
    ew = torch.round(torch.sqrt(area / aspect)).to(torch.int64)
    fits = (eh < h) & (ew < w)
    first = torch.where(fits.any(1), fits.to(torch.int8).argmax(1), 0)
    erase &= fits.any(1)
    pick = first[:, None]
    eh, ew = eh.gather(1, pick)[:, 0], ew.gather(1, pick)[:, 0]
    offsets = u[:, 1 + 2 * attempts :].view(b, attempts, 2).gather(1, pick[:, :, None].expand(b, 1, 2))[:, 0]
    top = (offsets[:, 0] * (h - eh + 1).to(torch.float32)).to(torch.int64).clamp(max=h - 1)
    left = (offsets[:, 1] * (w - ew + 1).to(torch.float32)).to(torch.int64).clamp(max=w - 1)
    ys = torch.arange(h, device=images.device)[None, :]
    xs = torch.arange(w, device=images.device)[None, :]
    inside_y = (ys >= top[:, None]) & (ys < (top + eh)[:, None])
    inside_x = (xs >= left[:, None]) & (xs < (left + ew)[:, None])
    mask = erase[:, None, None] & inside_y[:, :, None] & inside_x[:, None, :]
    return images.masked_fill(mask[:, None], 0)


def random_resized_crop_boxes(
    keys: Tensor,
    heights: Tensor,
    widths: Tensor,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Tensor:
    """torchvision's RandomResizedCrop box for each image, (B, 4) int64 (top, left, h, w): of
    ``attempts`` draws of area share and log-uniform aspect, the first that fits, else the
    centred crop of the whole image clamped to ``ratio``."""
    heights, widths = heights.to(torch.int64), widths.to(torch.int64)
    u = key_uniform(keys, stream=2, count=4 * attempts).view(-1, attempts, 4).to(torch.float64)
    area = (heights * widths).to(torch.float64)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_low, log_high = torch.log(torch.tensor(ratio, dtype=torch.float64, device=keys.device))
    aspect = torch.exp(log_low + (log_high - log_low) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect)).to(torch.int64)
    h = torch.round(torch.sqrt(target / aspect)).to(torch.int64)
    fits = (w > 0) & (h > 0) & (w <= widths[:, None]) & (h <= heights[:, None])
    top = (u[..., 2] * (heights[:, None] - h + 1)).to(torch.int64)
    left = (u[..., 3] * (widths[:, None] - w + 1)).to(torch.int64)
    first = fits.to(torch.int8).argmax(1, keepdim=True)
    boxes = torch.stack([t.gather(1, first)[:, 0] for t in (top, left, h, w)], 1)
    # the fallback: the whole image, cut to the nearest allowed aspect ratio
    in_ratio = widths.to(torch.float64) / heights.to(torch.float64)
    fw = torch.where(in_ratio > ratio[1], torch.round(heights * ratio[1]).to(torch.int64), widths)
    fh = torch.where(in_ratio < ratio[0], torch.round(widths / ratio[0]).to(torch.int64), heights)
    fallback = torch.stack([(heights - fh) // 2, (widths - fw) // 2, fh, fw], 1)
    return torch.where(fits.any(1, keepdim=True), boxes, fallback)


def resized_crops(images: Tensor, boxes: Tensor, size: int, flip: Optional[Tensor] = None) -> Tensor:
    """Each image's box (top, left, h, w) resized to ``size`` x ``size`` (bilinear), mirrored
    where ``flip``: one ``grid_sample`` for the batch, float32 out on the 0-255 scale. Samples
    at the box's edge blend with the pixels just outside it, where a crop-then-resize repeats the
    edge pixel."""
    b, _, h, w = images.shape
    top, left, bh, bw = (boxes[:, i].to(torch.float32) for i in range(4))
    sx, sy = bw / w, bh / h
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * left + bw) / w - 1
    theta[:, 1, 1], theta[:, 1, 2] = sy, (2 * top + bh) / h - 1
    grid = torch.nn.functional.affine_grid(theta, [b, 3, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(
        images.to(torch.float32), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
