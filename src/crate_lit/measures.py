"""White-box measurements of CRATE: coding rate, sparsity, attention masks, PCA maps.

Everything here works on a :class:`~crate_lit.models.crate.WhiteboxTrace` (from
``Crate.trace`` / ``CrateMAE.trace``) or on plain tensors; no Lightning involved, and no
drawing (the figures of these numbers are in :mod:`crate_lit.figures`).
Definitions follow section 3 of the reference spec ("White-box measurements"):

* coding rate ``R^c = 1/2 sum_heads logdet(I_N + p/(N eps) W W^T)`` of the unit-normalised
  MSSA projections ``U LN(Z^l)``, per image;
* sparsity: the fraction of exactly-zero entries of the ISTA output ``Z^{l+1}``;
* DINO-style masks of the class token's attention, PCA maps of patch features.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "coding_rate",
    "sparsity",
    "normalized_l0",
    "layer_measures",
    "layerwise_stats",
    "summarize_layers",
    "cls_attention_maps",
    "dino_masks",
    "upsample_masks",
    "upsample_maps",
    "UPSAMPLE_MODES",
    "attention_masks",
    "iou",
    "centre_box_mask",
    "segmentation_scores",
    "pca_feature_maps",
    "pca_masks",
]


def _out_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


# -- coding rate and sparsity ---------------------------------------------------------------
def coding_rate(w: Tensor, eps: float = 0.01) -> Tensor:
    """Compression term per image: (B, heads, N, p) -> (B,).

    Every token vector of every head is scaled to unit length, then
    ``R^c = 1/2 * sum_heads logdet(I_N + (p / (N * eps)) W W^T)``. The logdet is taken,
    in float64 through a Cholesky factor, of the smaller Gram matrix: ``W^T W`` (p x p)
    when p < N (Sylvester: same determinant), else ``W W^T`` (N x N).
    """
    if w.dim() != 4:
        raise ValueError(f"coding_rate expects (B, heads, N, p), got shape {tuple(w.shape)}")
    _, _, n, p = w.shape
    x = F.normalize(w.detach().to(torch.float64), dim=-1)
    alpha = p / (n * eps)
    gram = x.transpose(-2, -1) @ x if p < n else x @ x.transpose(-2, -1)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(eye + alpha * gram)
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (B, heads)
    return (0.5 * logdet.sum(-1)).to(_out_dtype(w))


def sparsity(z: Tensor) -> Tensor:
    """Fraction of exactly-zero entries per image: (B, N, d) -> (B,)."""
    return (z.detach() == 0).reshape(z.shape[0], -1).to(_out_dtype(z)).mean(-1)


def normalized_l0(z: Tensor) -> Tensor:
    """Normalised ``||Z||_0``: fraction of non-zero entries per image, ``1 - sparsity(z)``."""
    return 1.0 - sparsity(z)


def _mean_std(values: Tensor) -> Tuple[float, float]:
    v = values.to(torch.float64)
    return float(v.mean()), float(v.std(correction=0))


def layer_measures(trace: Any, eps: float = 0.01) -> Tuple[Tensor, Tensor]:
    """Per layer and image of a ``WhiteboxTrace``: R^c (from ``subspace``) and sparsity (from
    ``sparse``), each (layers, B). Batches can be concatenated along dim 1 before summarising."""
    rates = torch.stack([coding_rate(layer.subspace, eps) for layer in trace.layers])
    zeros = torch.stack([sparsity(layer.sparse) for layer in trace.layers])
    return rates, zeros


def summarize_layers(rates: Tensor, zeros: Tensor) -> List[Dict[str, float]]:
    """Mean/std over images, per layer, of (layers, B) coding rates and sparsities.

    Keys: ``layer`` (1-based), ``coding_rate_mean``, ``coding_rate_std``, ``sparsity_mean``,
    ``sparsity_std``, ``l0_mean`` (= 1 - ``sparsity_mean``). Stds are population stds
    (finite for a single image). All values are Python floats (``layer`` an int).
    """
    stats: List[Dict[str, float]] = []
    for index, (rate, zero) in enumerate(zip(rates, zeros, strict=True), start=1):
        rc_mean, rc_std = _mean_std(rate)
        sp_mean, sp_std = _mean_std(zero)
        stats.append(
            dict(
                layer=index,
                coding_rate_mean=rc_mean,
                coding_rate_std=rc_std,
                sparsity_mean=sp_mean,
                sparsity_std=sp_std,
                l0_mean=1.0 - sp_mean,
            )
        )
    return stats


def layerwise_stats(trace: Any, eps: float = 0.01) -> List[Dict[str, float]]:
    """:func:`summarize_layers` of one trace's :func:`layer_measures`."""
    return summarize_layers(*layer_measures(trace, eps))


# -- attention maps and masks ---------------------------------------------------------------
def cls_attention_maps(attention: Tensor, grid_size: Tuple[int, int]) -> Tensor:
    """Class-token row over the patch tokens: (B, heads, N, N) -> (B, heads, gh, gw).

    Takes row 0 (the class token as query) and columns 1: (the patches, class token dropped);
    the values are not renormalised.
    """
    gh, gw = int(grid_size[0]), int(grid_size[1])
    b, h, n, _ = attention.shape
    if n - 1 != gh * gw:
        raise ValueError(f"attention has {n - 1} patch tokens, grid {gh}x{gw} needs {gh * gw}")
    return attention[:, :, 0, 1:].reshape(b, h, gh, gw)


def dino_masks(maps: Tensor, keep: float = 0.6) -> Tensor:
    """DINO-style masks: per image and head, the top patches holding a share ``keep`` of the mass.

    Rule (the one of DINO's ``visualize_attention.py``): normalise each head's map to sum 1,
    sort descending; a patch is kept iff the mass of the patches ranked strictly above it is
    < ``keep``. That is the smallest top set whose mass reaches ``keep``; the top patch is
    always kept. E.g. mass [0.5, 0.3, 0.1, 0.1], keep 0.6 -> the top two (0.5 < 0.6, 0.8 >= 0.6).
    Ties are ranked by position (stable sort); "reaches" allows 16 ulps of the input dtype.
    (..., gh, gw) -> bool of the same shape.
    """
    shape = maps.shape
    flat = maps.detach().reshape(*shape[:-2], -1).to(torch.float64)
    mass = flat / flat.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    values, order = torch.sort(mass, dim=-1, descending=True, stable=True)
    above = torch.cumsum(values, dim=-1) - values  # mass strictly above each ranked patch
    tol = 16 * torch.finfo(maps.dtype if maps.is_floating_point() else torch.float32).eps
    kept_sorted = above < keep - tol  # a share equal to keep up to the input's rounding counts as reached
    kept_sorted[..., 0] = True
    kept = torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)
    return kept.reshape(shape)


def upsample_masks(masks: Tensor, image_size: Tuple[int, int]) -> Tensor:
    """Nearest upsampling of bool masks (..., gh, gw) -> (..., H, W)."""
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).to(torch.float32)
    up = F.interpolate(flat, size=(int(image_size[0]), int(image_size[1])), mode="nearest")
    return up.reshape(*lead, *up.shape[-2:]) > 0.5


def iou(pred: Tensor, target: Tensor) -> Tensor:
    """Intersection over union of bool masks (..., H, W) -> (...,); two empty masks score 1."""
    pred, target = pred.bool(), target.bool()
    inter = (pred & target).sum((-2, -1)).to(torch.float64)
    union = (pred | target).sum((-2, -1)).to(torch.float64)
    out = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return out.to(torch.get_default_dtype())


def centre_box_mask(image_size: Tuple[int, int], device: Optional[torch.device] = None) -> Tensor:
    """Centre-box baseline: rows ``[H//4, H//4 + H//2)`` and columns ``[W//4, W//4 + W//2)``.

    The middle half of each side, i.e. 25% of the area when H and W are multiples of 4.
    """
    h, w = int(image_size[0]), int(image_size[1])
    box = torch.zeros(h, w, dtype=torch.bool, device=device)
    box[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = True
    return box


# How attention maps on the patch grid become pixel masks (see :func:`attention_masks`).
UPSAMPLE_MODES: Tuple[str, ...] = ("bilinear", "nearest")


def upsample_maps(maps: Tensor, image_size: Tuple[int, int]) -> Tensor:
    """Bilinear upsampling of attention maps (..., gh, gw) -> float32 (..., H, W).

    Pixel centres are interpolated between patch centres (``align_corners=False``), so a value
    sits at the centre of its patch, as it does in the image.
    """
    lead = maps.shape[:-2]
    flat = maps.detach().reshape(-1, 1, *maps.shape[-2:]).to(torch.float32)
    size = (int(image_size[0]), int(image_size[1]))
    up = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return up.reshape(*lead, *up.shape[-2:])


def attention_masks(
    maps: Tensor, image_size: Tuple[int, int], keep: float = 0.6, upsample: str = "bilinear"
) -> Tensor:
    """Pixel masks (..., H, W) of attention maps (..., gh, gw) keeping a share ``keep`` of the mass.

    ``nearest``: :func:`dino_masks` on the patch grid, each kept patch painted as a block (DINO's
    ``visualize_attention.py``). ``bilinear``: the map is first interpolated to pixel resolution
    (:func:`upsample_maps`) and the same mass rule picks pixels. On a coarse grid (the 6 x 6 of
    the 48 px demo) a patch is a large part of an object, so block masks cannot follow its
    outline; interpolation uses the neighbouring patches to place the boundary inside a patch.
    """
    if upsample == "nearest":
        return upsample_masks(dino_masks(maps, keep), image_size)
    if upsample == "bilinear":
        return dino_masks(upsample_maps(maps, image_size), keep)
    raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")


def segmentation_scores(
    maps: Tensor, gt_masks: Tensor, keep: float = 0.6, upsample: str = "bilinear"
) -> Dict[str, Any]:
    """Score CLS attention maps (B, heads, gh, gw) against ground-truth masks (B, H, W).

    Each head's map becomes an H x W mask with :func:`attention_masks` (``keep``, ``upsample``).
    Returns plain floats/lists: ``per_head_iou`` (mean IoU over the batch, per head),
    ``best_head`` (index of the head with the highest mean IoU) and ``best_head_iou``,
    ``union_iou`` (mean IoU of the union of all heads' masks), and the baselines
    ``all_foreground_iou`` (every pixel foreground) and ``centre_box_iou``
    (see :func:`centre_box_mask`), plus the ``keep`` and ``upsample`` used.
    """
    gt = gt_masks.bool()
    size = (gt.shape[-2], gt.shape[-1])
    pred = attention_masks(maps, size, keep, upsample)  # (B, heads, H, W)
    per_head = iou(pred, gt.unsqueeze(1)).mean(0)  # (heads,)
    best = int(torch.argmax(per_head))
    union = iou(pred.any(dim=1), gt).mean()
    full = iou(torch.ones_like(gt), gt).mean()
    box = iou(centre_box_mask(size, gt.device).expand_as(gt), gt).mean()
    return dict(
        per_head_iou=[float(v) for v in per_head],
        best_head=best,
        best_head_iou=float(per_head[best]),
        union_iou=float(union),
        all_foreground_iou=float(full),
        centre_box_iou=float(box),
        keep=float(keep),
        upsample=upsample,
    )


# -- PCA maps -------------------------------------------------------------------------------
def pca_feature_maps(features: Tensor, grid_size: Tuple[int, int], n_components: int = 3) -> Tensor:
    """Joint PCA of patch features (B, P, d) -> maps (B, n_components, gh, gw) in [0, 1].

    Centres all B*P tokens together, projects on the top right-singular vectors, and min-max
    scales each component over the whole batch (a constant component maps to 0). Sign
    convention: each principal direction is flipped so that its largest-magnitude loading (the
    first of several equal ones) is positive, as scikit-learn's ``svd_flip`` on V, which makes
    the output the same on every machine.
    """
    b, p, d = features.shape
    gh, gw = int(grid_size[0]), int(grid_size[1])
    if p != gh * gw:
        raise ValueError(f"{p} patch tokens do not fill a {gh}x{gw} grid")
    if not 1 <= n_components <= min(b * p, d):
        raise ValueError(f"n_components must be in [1, {min(b * p, d)}], got {n_components}")
    x = features.detach().reshape(b * p, d).to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[:n_components]  # (k, d)
    # the first loading within rounding of the largest: loadings of equal magnitude (a direction
    # such as (1, -1)/sqrt(2)) would otherwise pick their pivot by the last bit of the SVD, which
    # differs between torch builds, and flip the component's colours between machines
    magnitude = comps.abs()
    near_max = magnitude >= magnitude.max(dim=1, keepdim=True).values * (1 - 1e-6)
    pivot = near_max.to(torch.int8).argmax(dim=1, keepdim=True)
    comps = comps * torch.sign(comps.gather(1, pivot))
    proj = x @ comps.T  # (B*P, k)
    low, high = proj.min(0).values, proj.max(0).values
    span = high - low
    scaled = torch.where(span > 0, (proj - low) / torch.where(span > 0, span, 1.0), torch.zeros_like(proj))
    maps = scaled.reshape(b, gh, gw, n_components).permute(0, 3, 1, 2).contiguous()
    return maps.to(_out_dtype(features))


def pca_masks(pca_maps: Tensor, threshold: float = 0.5) -> Tensor:
    """Foreground masks from PCA maps (B, k, gh, gw): first component > threshold -> (B, gh, gw)."""
    return pca_maps[:, 0] > threshold
