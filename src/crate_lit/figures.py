"""Figures of CRATE's white-box measurements (:mod:`crate_lit.measures`) and of CRATE-MAE
reconstructions: layer-wise coding rate and sparsity, class-token attention maps and masks,
reconstruction grids, PCA maps, each saved as a PNG.

matplotlib is imported lazily and always renders with the Agg backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .measures import upsample_masks
from .runs import atomic_write

__all__ = [
    "denormalize",
    "layerwise_figure",
    "plot_layerwise",
    "attention_figure",
    "plot_attention_grid",
    "reconstruction_figure",
    "plot_reconstructions",
    "plot_pca_maps",
]

PathLike = Union[str, Path]


def denormalize(images: Tensor, datamodule: Any) -> Tensor:
    """Images back to [0, 1] with the data module's ``mean``/``std`` (0.5 when it has none),
    as float32 on the CPU, ready to plot."""
    mean = torch.tensor(getattr(datamodule, "mean", (0.5,) * 3)).view(1, 3, 1, 1)
    std = torch.tensor(getattr(datamodule, "std", (0.5,) * 3)).view(1, 3, 1, 1)
    return (images.detach().float().cpu() * std + mean).clamp(0, 1)


def _canvas(width: float, height: float, **kwargs: Any):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), **kwargs)


def _figure(rows: int, cols: int, panel: float = 1.6, **kwargs: Any):
    fig = _canvas(cols * panel, rows * panel, **kwargs)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    return fig, axes


def _framed_grid(rows: int, cols: int, left: float, right: float, top: float, panel: float = 1.6):
    """A grid of ``panel``-inch cells with margins in inches (row labels on the left, a colour
    bar on the right, a title on top): margins as fractions would squeeze the labels of a
    figure with many rows or columns and waste space on one with few."""
    bottom = 0.1
    width, height = cols * panel + left + right, rows * panel + top + bottom
    fig = _canvas(width, height)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=0.05,
        hspace=0.1,
    )
    return fig, axes


def _about(source: Optional[str], epoch: Optional[int]) -> str:
    """The line that says which weights a figure shows."""
    parts = [str(source)] if source else []
    if epoch is not None:
        parts.append(f"epoch {epoch}")
    return ", ".join(parts)


def _label_row(ax: Any, label: str) -> None:
    ax.set_ylabel(label, fontsize=7)


def _save(fig: Any, path: PathLike, dpi: int = 100) -> Path:
    return atomic_write(path, lambda handle: fig.savefig(handle, dpi=dpi, format="png"))


def _to_hwc(image: Tensor) -> np.ndarray:
    """(C, H, W) float -> (H, W, C) or (H, W) numpy in [0, 1]."""
    arr = image.detach().to(torch.float32).clamp(0, 1).cpu()
    if arr.dim() == 3 and arr.shape[0] == 1:
        arr = arr[0]
    return arr.permute(1, 2, 0).numpy() if arr.dim() == 3 else arr.numpy()


def _imshow(ax: Any, data: Any, title: Optional[str] = None, **kwargs: Any) -> None:
    if getattr(data, "ndim", 3) == 2:
        kwargs.setdefault("cmap", "gray")
    ax.imshow(data, interpolation="nearest", **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def layerwise_figure(stats: Sequence[Dict[str, float]], family: str = "CRATE") -> Any:
    """Layer-wise coding rate R^c (mean +- std band) and the non-zero fraction of the ISTA
    step's sparse code (normalised ||Z||_0 = 1 - sparsity, +- std), side by side; a matplotlib
    Figure. The code is CRATE's ISTA output Z^{l+1}, CRATE-alpha's A2 (``family``)."""
    code = "ISTA code $A_2$" if family == "CRATE-alpha" else "ISTA output $Z^{\\ell+1}$"
    fig, axes = _figure(1, 2, panel=3.2, layout="constrained")
    layers = np.array([s.get("layer", i + 1) for i, s in enumerate(stats)], dtype=float)
    curves = [
        (
            "coding_rate_mean",
            "coding_rate_std",
            "Compression: coding rate of $U^* \\mathrm{LN}(Z^{\\ell})$\n(lower: more compressed)",
            "$R^c$",
            "tab:blue",
        ),
        (
            "l0_mean",
            "sparsity_std",
            f"{code}: non-zero fraction\n(lower: sparser)",
            "non-zero fraction (1 - sparsity)",
            "tab:red",
        ),
    ]
    for ax, (mean_key, std_key, title, ylabel, color) in zip(axes[0], curves, strict=True):
        mean = np.array([s[mean_key] for s in stats], dtype=float)
        std = np.array([s.get(std_key, 0.0) for s in stats], dtype=float)
        ax.plot(layers, mean, marker="o", color=color)
        ax.fill_between(layers, mean - std, mean + std, color=color, alpha=0.25)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer index $\\ell$")
        ax.set_ylabel(ylabel)
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    title = f"Layer-wise compression and sparsity of {family} (mean $\\pm$ std over images)"
    fig.suptitle(title, fontsize=10)
    return fig


def plot_layerwise(stats: Sequence[Dict[str, float]], path: PathLike, family: str = "CRATE") -> Path:
    """:func:`layerwise_figure` saved as a PNG."""
    return _save(layerwise_figure(stats, family), path)


def attention_figure(
    images: Tensor,
    maps: Tensor,
    masks: Optional[Tensor] = None,
    *,
    layer: Optional[int] = None,
    depth: Optional[int] = None,
    source: Optional[str] = None,
    epoch: Optional[int] = None,
    mask_rule: Optional[str] = None,
) -> Any:
    """Rows: images; columns: the image, then each head's CLS attention map (nearest-upsampled
    heatmap, one colour scale for all, shown by the colour bar). With ``masks`` bool, on the
    patch grid (B, heads, gh, gw) or at pixel resolution (B, heads, H, W, e.g. from
    :func:`attention_masks`), each image gets a second row with every head's mask overlaid on
    the image. The title names the ``layer`` (of ``depth``), the weights (``source``, e.g. the
    checkpoint file) and the ``epoch``; ``mask_rule`` labels the mask rows. A matplotlib Figure."""
    b, heads = maps.shape[:2]
    size = (images.shape[-2], images.shape[-1])
    up = F.interpolate(maps.detach().to(torch.float32).cpu(), size=size, mode="nearest")
    up_masks = upsample_masks(masks.cpu(), size) if masks is not None else None
    per_image = 2 if up_masks is not None else 1
    fig, axes = _framed_grid(b * per_image, heads + 1, left=0.45, right=0.85, top=0.7)
    # one scale for every head and image: the class token's attention weights sum to 1 over
    # the tokens, so the maps are comparable, and one colour bar can read all of them
    scale = dict(vmin=0.0, vmax=max(float(up.max()), 1e-12))
    mask_label = f"masks ({mask_rule})" if mask_rule else "masks"
    heat = None
    for i in range(b):
        image = _to_hwc(images[i])
        row = i * per_image
        _imshow(axes[row, 0], image, "image" if i == 0 else None)
        _label_row(axes[row, 0], f"image {i + 1}\nattention")
        for h in range(heads):
            title = f"head {h}" if i == 0 else None
            _imshow(axes[row, h + 1], up[i, h].numpy(), title, cmap="inferno", **scale)
            heat = axes[row, h + 1].images[-1]
        if up_masks is not None:
            label_cell = axes[row + 1, 0]  # no picture, only the row's label
            label_cell.set_xticks([])
            label_cell.set_yticks([])
            for spine in label_cell.spines.values():
                spine.set_visible(False)
            _label_row(label_cell, f"image {i + 1}\n{mask_label}")
            for h in range(heads):
                ax = axes[row + 1, h + 1]
                _imshow(ax, image)
                overlay = np.ma.masked_where(~up_masks[i, h].numpy(), np.ones(size))
                ax.imshow(overlay, cmap="autumn", alpha=0.5, vmin=0, vmax=1, interpolation="nearest")
    first, last = axes[0, -1].get_position(), axes[-1, -1].get_position()
    bar = fig.add_axes(
        (first.x1 + 0.15 / fig.get_figwidth(), last.y0, 0.12 / fig.get_figwidth(), first.y1 - last.y0)
    )
    fig.colorbar(heat, cax=bar)
    bar.set_ylabel("class-token attention weight", fontsize=7)
    bar.tick_params(labelsize=6)
    title = "Class-token attention of every head"
    if layer is not None:
        title += f", layer {layer}" + (f" of {depth}" if depth is not None else "")
    about = _about(source, epoch)
    fig.suptitle(
        title + (f"\n{about}" if about else ""), fontsize=8, y=1 - 0.05 / fig.get_figheight(), va="top"
    )
    return fig


def plot_attention_grid(
    images: Tensor, maps: Tensor, masks: Optional[Tensor], path: PathLike, **details: Any
) -> Path:
    """:func:`attention_figure` (``details``: its title and label keywords) saved as a PNG."""
    return _save(attention_figure(images, maps, masks, **details), path)


def reconstruction_figure(
    originals: Tensor,
    masked: Tensor,
    outputs: Tensor,
    *,
    visible_pasted: bool,
    mask_ratio: Optional[float] = None,
    source: Optional[str] = None,
    epoch: Optional[int] = None,
    row_labels: Optional[Sequence[str]] = None,
) -> Any:
    """Rows: images; columns: original, masked input, the decoder's output (all clamped to
    [0, 1]). ``visible_pasted`` says which output it is: with the visible patches pasted back
    from the input (only the masked ones are predicted: the MAE reconstruction) or the
    prediction at every patch, visible ones included. A matplotlib Figure."""
    b = originals.shape[0]
    fig, axes = _framed_grid(b, 3, left=0.45 if row_labels else 0.1, right=0.1, top=0.75)
    removed = f"\n({mask_ratio:.0%} removed)".replace("%", " %") if mask_ratio is not None else ""
    output = "visible + predicted\npatches" if visible_pasted else "decoder output\n(every patch)"
    titles = ("original", f"masked input{removed}", output)
    for i in range(b):
        for j, batch in enumerate((originals, masked, outputs)):
            _imshow(axes[i, j], _to_hwc(batch[i]), titles[j] if i == 0 else None)
        if row_labels:
            _label_row(axes[i, 0], str(row_labels[i]))
    if visible_pasted:
        title = (
            "CRATE-MAE reconstruction: masked patches predicted,\nvisible patches pasted back from the input"
        )
    else:
        title = "CRATE-MAE decoder output at every patch\n(visible patches predicted too, not pasted back)"
    about = _about(source, epoch)
    fig.suptitle(
        title + (f"\n{about}" if about else ""), fontsize=8, y=1 - 0.05 / fig.get_figheight(), va="top"
    )
    return fig


def plot_reconstructions(
    originals: Tensor, masked: Tensor, outputs: Tensor, path: PathLike, **details: Any
) -> Path:
    """:func:`reconstruction_figure` (``details``: ``visible_pasted`` and its title and label
    keywords) saved as a PNG."""
    return _save(reconstruction_figure(originals, masked, outputs, **details), path)


def plot_pca_maps(images: Tensor, pca_maps: Tensor, path: PathLike) -> Path:
    """Rows: images; columns: the image, the first three PCA components as RGB (when there are
    at least three), each component, and the mask ``component 1 > 0.5``."""
    b, k = pca_maps.shape[:2]
    size = (images.shape[-2], images.shape[-1])
    up = F.interpolate(pca_maps.detach().to(torch.float32).cpu(), size=size, mode="nearest")
    rgb = k >= 3
    fig, axes = _figure(b, 1 + int(rgb) + k + 1)
    for i in range(b):
        first = i == 0
        image = _to_hwc(images[i])
        _imshow(axes[i, 0], image, "image" if first else None)
        col = 1
        if rgb:
            composite = up[i, :3].permute(1, 2, 0).clamp(0, 1).numpy()
            _imshow(axes[i, col], composite, "PCA 1-3" if first else None)
            col += 1
        for c in range(k):
            title = f"PC {c + 1}" if first else None
            _imshow(axes[i, col], up[i, c].numpy(), title, cmap="viridis", vmin=0, vmax=1)
            col += 1
        _imshow(axes[i, col], (up[i, 0] > 0.5).float().numpy(), "PC 1 > 0.5" if first else None, cmap="gray")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93, wspace=0.05, hspace=0.05)
    return _save(fig, path)
