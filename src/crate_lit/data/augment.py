"""Per-image random numbers and the batched transforms drawn from them, on the device.

Each training image carries a 63-bit key (``loading.EpochSampler``). ``key_uniform`` turns the
keys into numbers with a counter-based hash, so an image's flip, crop or erased rectangle
depends on its key alone, not on the batch it falls in, the device or the DDP rank. The
transforms take uint8 or float images (B, C, H, W) and their per-image parameters, and do for
a whole batch in a few tensor operations what torchvision does image by image. Mixup/cutmix
(``mixup_cutmix``) draws from the keys too, but mixes each image with another of its batch.

Streams of ``key_uniform`` in use: 1 shapes' flip and crop, 2 random resized crops, 3 random
erasing, 4 flips, 5 mixing decisions and cutmix boxes, 6 and 7 mixup's and cutmix's Beta draws.
"""

from __future__ import annotations

import math
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


# ---------------------------------------------------------------------------------------------
# mixup / cutmix (timm's Mixup in its per-image "elem" mode), drawn from the keys

# what conf/train.yaml's mixup block holds when nothing is mixed
MIXING_OFF = {"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5}
# Marsaglia-Tsang proposals per Gamma sample: each is accepted with probability > 0.95 (shape
# >= 1), so all of them fail about once in 1e10 samples, and then a fixed value stands in
_GAMMA_ATTEMPTS = 8


def _log_gamma(u: Tensor, alpha: float) -> Tensor:
    """log of Gamma(alpha, 1) samples from uniforms ``u`` (..., 3 * attempts + 1): Marsaglia and
    Tsang's squeeze on normals made by Box-Muller, the first accepted proposal of each row; for
    alpha < 1 a Gamma(alpha + 1) sample times U^(1/alpha). On the log scale, so that tiny samples
    (alpha well below 1) do not underflow to 0."""
    attempts = (u.shape[-1] - 1) // 3
    shape = alpha + 1.0 if alpha < 1.0 else alpha
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    u1, u2, u3 = u[..., :attempts], u[..., attempts : 2 * attempts], u[..., 2 * attempts : 3 * attempts]
    # key_uniform's numbers are in [0, 1): 1 - u is in (0, 1], whose log is finite
    z = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos((2.0 * math.pi) * u2)
    v = (1.0 + c * z) ** 3
    log_v = torch.log(v.clamp_min(torch.finfo(v.dtype).tiny))
    accept = (v > 0) & (torch.log1p(-u3) < 0.5 * z * z + d - d * v + d * log_v)
    first = accept.to(torch.int8).argmax(-1, keepdim=True)
    # no proposal accepted: v = 1, the centre of the proposals (deterministic, as all else here)
    log_sample = torch.where(accept.any(-1), log_v.gather(-1, first)[..., 0], 0.0) + math.log(d)
    if alpha < 1.0:
        log_sample = log_sample + torch.log1p(-u[..., 3 * attempts]) / alpha
    return log_sample


def beta_symmetric(keys: Tensor, alpha: float, stream: int) -> Tensor:
    """One Beta(alpha, alpha) number per image, float32 (B,), drawn from the images' keys on
    their device: X / (X + Y) with X, Y ~ Gamma(alpha), a fixed number of vectorised attempts
    each, so no loop waits on the device."""
    if not alpha > 0:
        raise ValueError(f"Beta(alpha, alpha) needs alpha > 0, got {alpha!r}")
    per_gamma = 3 * _GAMMA_ATTEMPTS + 1
    u = key_uniform(keys, stream, count=2 * per_gamma).view(-1, 2, per_gamma)
    log_xy = _log_gamma(u, float(alpha))
    return torch.sigmoid(log_xy[:, 0] - log_xy[:, 1])  # X / (X + Y), without forming X + Y


def mixing_parameters(
    keys: Tensor,
    height: int,
    width: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Each image's mixing, drawn from its key as timm's ``Mixup(mode="elem")`` draws it:
    ``lam`` (B,) float32, the image's own share (1: not mixed; for cutmix, 1 - the box's area
    share after clipping, timm's ``correct_lam``), ``cut`` (B,) bool (a pasted box rather than
    a blend) and the box (B, 4) int64 (top, bottom, left, right; rows top..bottom-1), as timm's
    ``rand_bbox``: sides ``int(side * sqrt(1 - lam))`` around an integer centre drawn uniformly
    over the image, clipped to it."""
    b = keys.shape[0]
    u = key_uniform(keys, stream=5, count=4)
    cut = torch.zeros(b, dtype=torch.bool, device=keys.device)
    lam = torch.ones(b, dtype=torch.float32, device=keys.device)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        cut = u[:, 1] < switch_prob
        lam = torch.where(cut, beta_symmetric(keys, cutmix_alpha, 7), beta_symmetric(keys, mixup_alpha, 6))
    elif mixup_alpha > 0:
        lam = beta_symmetric(keys, mixup_alpha, 6)
    elif cutmix_alpha > 0:
        cut = torch.ones_like(cut)
        lam = beta_symmetric(keys, cutmix_alpha, 7)
    mixed = u[:, 0] < prob
    lam = torch.where(mixed, lam, 1.0)
    cut = cut & mixed
    ratio = torch.sqrt(1.0 - lam)
    cut_h = (height * ratio).to(torch.int64)
    cut_w = (width * ratio).to(torch.int64)
    cy = (u[:, 2] * height).to(torch.int64).clamp(max=height - 1)
    cx = (u[:, 3] * width).to(torch.int64).clamp(max=width - 1)
    box = torch.stack(
        [
            (cy - cut_h // 2).clamp(0, height),
            (cy + (cut_h + 1) // 2).clamp(0, height),
            (cx - cut_w // 2).clamp(0, width),
            (cx + (cut_w + 1) // 2).clamp(0, width),
        ],
        1,
    )
    area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    lam = torch.where(cut, 1.0 - area.to(torch.float32) / float(height * width), lam)
    return lam, cut, box


def mix_images(images: Tensor, lam: Tensor, cut: Tensor, box: Tensor) -> Tensor:
    """Image i (float, (B, C, H, W)) mixed with image B-1-i: inside its box where ``cut``, else
    blended ``lam * own + (1 - lam) * partner``. One ``lerp`` with a per-pixel weight: 1 keeps
    the own pixel and 0 takes the partner's exactly. In place on the flipped copy: a second
    batch-sized output took about twice as long on the CPU (memory-bound)."""
    _, _, h, w = images.shape
    ys = torch.arange(h, device=images.device)[None, :]
    xs = torch.arange(w, device=images.device)[None, :]
    rows = ((ys >= box[:, 0:1]) & (ys < box[:, 1:2]) & cut[:, None]).to(images.dtype)
    cols = ((xs >= box[:, 2:3]) & (xs < box[:, 3:4])).to(images.dtype)
    blend = torch.where(cut, 1.0, lam).to(images.dtype)
    # blend - rows x cols: 0 inside a pasted box, else the image's blend weight (1 for a cut
    # image), exactly; one broadcast product, 4x faster on the CPU than masks and a where
    weight = torch.addcmul(blend[:, None, None], rows[:, :, None], cols[:, None, :], value=-1)
    return images.flip(0).lerp_(images, weight[:, None])


def mix_targets(labels: Tensor, lam: Tensor, num_classes: int) -> Tensor:
    """The soft targets of mixed images, (B, num_classes) float32: ``lam * onehot(y_i) + (1 -
    lam) * onehot(y_{B-1-i})`` (timm's ``mixup_target`` without smoothing; the loss smooths)."""
    one_hot = torch.zeros(len(labels), num_classes, device=labels.device, dtype=lam.dtype)
    one_hot.scatter_(1, labels[:, None].to(torch.int64), 1.0)
    return lam[:, None] * one_hot + (1.0 - lam[:, None]) * one_hot.flip(0)


def mixup_cutmix(
    images: Tensor,
    labels: Tensor,
    keys: Tensor,
    num_classes: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> Tuple[Tensor, Tensor]:
    """Mixup and cutmix of a training batch on its device, timm's ``Mixup`` in its per-image
    ("elem") mode: image i is mixed with image B-1-i (the batch flipped); with probability
    ``prob`` an image is mixed, by cutmix with probability ``switch_prob`` when both alphas are
    > 0, else by mixup; mixup blends with lam ~ Beta(mixup_alpha, mixup_alpha), cutmix pastes
    the partner's box (``mixing_parameters``) with lam ~ Beta(cutmix_alpha, cutmix_alpha)
    corrected to the box's clipped area. Returns the mixed float images and the soft targets
    (``mix_targets``); an alpha of 0 turns that kind off, both 0 mix nothing.

    What is reproducible: every random number comes from the images' keys (``key_uniform``), a
    function of (seed, epoch, image index), so the same seed and epoch give each image the same
    lam, kind and box, with any worker count, resumed or not. The *partner* is the image at the
    mirrored position of the batch on this device, so pairs are the same for the same seed,
    epoch, batch size per device and device count, but one process and DDP ranks (whose
    per-device batches hold other images) pair different images. In a batch of odd size the
    middle image is its own partner (mixing leaves it as it is). Images are float (after the
    batch transforms and normalisation, as timm mixes normalised tensors); nothing waits on the
    device.
    """
    lam, cut, box = mixing_parameters(
        keys, images.shape[-2], images.shape[-1], mixup_alpha, cutmix_alpha, prob, switch_prob
    )
    return mix_images(images, lam, cut, box), mix_targets(labels, lam, num_classes)
