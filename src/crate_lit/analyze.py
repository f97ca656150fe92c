"""``crate-analyze``: white-box measurements of a trained CRATE or CRATE-MAE.

``crate-analyze ckpt_path=PATH data=shapes`` writes, into its own run folder, the layer-wise
coding rate and sparsity (CSV + figure), class-token attention maps of every head with their
DINO-style masks, for CRATE-MAE a reconstruction grid and PCA feature maps, on ``data=shapes``
the segmentation score against the ground-truth masks, and ``report.json`` with every number.
``task=knn`` instead measures k-NN and linear-probe accuracy on frozen features.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import whitebox
from .data import DATAMODULES
from .models import CrateMAE, load_pretrained
from .modules import build_classifier, build_model, to_container
from .train import USER_ERRORS, ConfigError, build_datamodule, config_dir

log = logging.getLogger("crate_lit.analyze")

# what report.json keeps of the segmentation score of every layer
_LAYER_KEYS = ("best_head", "best_head_iou", "union_iou")


# DataLoader settings are crate-analyze's own, whatever the training run used
_LOADER_KEYS = ("batch_size", "num_workers", "pin_memory", "persistent_workers", "cache_dir", "decode")


def load_checkpoint(cfg: DictConfig) -> Any:
    path = Path(str(cfg.ckpt_path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={path} does not exist; point it at a .ckpt or released .pth file")
    return torch.load(path, map_location="cpu", weights_only=True)


def inherit_data_settings(cfg: DictConfig, raw: Any) -> List[str]:
    """Analyse the images the model was trained for: a crate-lit checkpoint's data settings
    (image size, classes, shape scale...) replace the data config's, except those given on the
    command line and the loader settings. A setting the checkpoint predates takes the data
    module's default, which is what its run used. Applies only when the checkpoint's data module
    takes arguments of ``data=``'s (e.g. a shapes run analysed with ``data=shapes``).
    Returns the keys taken from the checkpoint."""
    saved = raw.get("datamodule_hyper_parameters") if isinstance(raw, dict) else None
    if not saved or not set(saved) <= set(cfg.data) - {"name"}:
        return []
    settings = {}  # the data module's defaults, then what the checkpoint saved
    if cfg.data.name in DATAMODULES:
        for name, param in inspect.signature(DATAMODULES[cfg.data.name]).parameters.items():
            if name in cfg.data and param.default is not param.empty:
                settings[name] = param.default
    settings.update(saved)
    given = set()
    if HydraConfig.initialized():
        given = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    taken = [k for k in settings if k not in _LOADER_KEYS and f"data.{k}" not in given]
    for key in taken:
        value = settings[key]
        cfg.data[key] = list(value) if isinstance(value, tuple) else value
    return taken


def load_model(cfg: DictConfig, raw: Any) -> torch.nn.Module:
    """The model a checkpoint holds: crate-lit checkpoints name it in their hyper-parameters;
    for a released file, ``model=NAME`` (e.g. ``model=crate_small``) says which to build."""
    path = Path(str(cfg.ckpt_path)).expanduser()
    hparams = (raw.get("hyper_parameters") or {}) if isinstance(raw, dict) else {}
    model_cfg = hparams.get("model")
    if model_cfg is None:
        if not cfg.get("model"):
            raise ConfigError(f"{path} does not name its model; add model=NAME (e.g. model=crate_small)")
        model_cfg = to_container(cfg.model)
    model_cfg = {**model_cfg, "pretrained": None}
    # A classification checkpoint (CrateClassifier's hyper-parameters include label_smoothing)
    # of a CRATE-MAE model holds the encoder inside CrateMAEClassifier (the linear probe), not
    # the bare CrateMAE that pre-training checkpoints and released files hold.
    build = build_classifier if "label_smoothing" in hparams else build_model
    model = build(model_cfg)
    load_pretrained(model, raw)
    return model.eval()


def _batches(cfg: DictConfig, datamodule: Any) -> List[Tuple[torch.Tensor, torch.Tensor, Any]]:
    """Up to ``num_images`` validation images (with ground-truth masks on shapes)."""
    datamodule.setup("validate")
    dataset = datamodule.val_set
    if hasattr(dataset, "return_mask"):
        dataset.return_mask = True
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False)
    batches, seen = [], 0
    for batch in loader:
        take = cfg.num_images - seen
        images, labels = datamodule.eval_batch(batch[0][:take]), batch[1][:take]
        masks = batch[2][:take] if len(batch) > 2 else None
        batches.append((images, labels, masks))
        seen += len(images)
        if seen >= cfg.num_images:
            break
    return batches


def _layer_index(layer: int, depth: int) -> int:
    """0-based index of ``layer`` (1-based from the front, or negative from the back)."""
    index = layer - 1 if layer > 0 else depth + layer
    if not 0 <= index < depth:
        raise ConfigError(f"layer={layer} is out of range for a model with {depth} layers")
    return index


@torch.no_grad()
def analyze_whitebox(cfg: DictConfig, model: torch.nn.Module, datamodule: Any, out: Path) -> Dict[str, Any]:
    rates, zeros = [], []
    maps, gt_masks, shown = [], [], None
    is_mae = isinstance(model, CrateMAE)
    mae_outputs = None
    for images, _, masks in _batches(cfg, datamodule):
        trace = model.trace(images, mask_ratio=cfg.mask_ratio) if is_mae else model.trace(images)
        batch_rates, batch_zeros = whitebox.layer_measures(trace)
        rates.append(batch_rates)
        zeros.append(batch_zeros)
        grid = trace.extras["grid_size"]
        # every layer's maps (layers, B, heads, gh, gw): the shapes report scores each layer
        maps.append(torch.stack([whitebox.cls_attention_maps(t.attention, grid) for t in trace.layers]))
        if masks is not None:
            gt_masks.append(masks)
        if shown is None:  # the first batch
            layer_index = _layer_index(cfg.layer, len(trace.layers))
            shown = images[: cfg.num_figure_images]
            if is_mae:
                mae_outputs = (trace, images[: cfg.num_figure_images])
    stats = whitebox.summarize_layers(torch.cat(rates, dim=1), torch.cat(zeros, dim=1))
    with open(out / "layerwise.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(stats[0]))
        writer.writeheader()
        writer.writerows(stats)
    whitebox.plot_layerwise(stats, out / "layerwise.png")
    maps_by_layer = torch.cat(maps, dim=1)
    maps_all = maps_by_layer[layer_index]
    figure_maps = maps_all[: len(shown)]
    # the figure shows exactly the masks that are scored
    figure_masks = whitebox.attention_masks(figure_maps, shown.shape[-2:], cfg.keep, cfg.upsample)
    whitebox.plot_attention_grid(
        whitebox.denormalize(shown, datamodule), figure_maps, figure_masks, out / "attention.png"
    )
    report: Dict[str, Any] = {
        "layerwise": stats,
        "attention_layer": layer_index + 1,
        "num_images": int(maps_all.shape[0]),
        "figures": {"layerwise": "layerwise.png", "attention": "attention.png"},
    }
    if gt_masks:
        gt = torch.cat(gt_masks)
        # every layer with the same rule: shows where in depth the object emerges
        scores = [whitebox.segmentation_scores(m, gt, cfg.keep, cfg.upsample) for m in maps_by_layer]
        report["segmentation"] = dict(scores[layer_index])
        by_layer = [{"layer": i + 1, **{k: s[k] for k in _LAYER_KEYS}} for i, s in enumerate(scores)]
        report["segmentation"]["by_layer"] = by_layer
    if mae_outputs is not None:
        trace, images = mae_outputs
        n = len(images)
        masked, recon = model.reconstruction_images(images, trace.output[:n], trace.extras["mask"][:n])
        whitebox.plot_reconstructions(
            whitebox.denormalize(images, datamodule),
            whitebox.denormalize(masked, datamodule),
            whitebox.denormalize(recon, datamodule),
            out / "reconstructions.png",
        )
        features = trace.layers[-1].subspace[:n, :, 1:].transpose(1, 2).flatten(2)
        pca = whitebox.pca_feature_maps(features, trace.extras["grid_size"])
        whitebox.plot_pca_maps(whitebox.denormalize(images, datamodule), pca, out / "pca.png")
        report["figures"].update({"reconstructions": "reconstructions.png", "pca": "pca.png"})
    return report


def _features(
    model: torch.nn.Module, datamodule: Any, dataset: Any, limit: int, batch_size: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (the class token, or the model's pre-logits) and labels of ``limit``
    images of ``dataset``, drawn at random with a fixed seed: a class-sorted dataset (image
    folders) would otherwise give only its first classes."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, order.tolist()), batch_size=batch_size
    )
    feats, labels = [], []
    for batch in loader:
        tokens = model.forward_features(datamodule.eval_batch(batch[0]))
        pooled = (
            model.forward_head(tokens, pre_logits=True) if hasattr(model, "forward_head") else tokens[:, 0]
        )
        feats.append(pooled)
        labels.append(batch[1])
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor, k: int
) -> float:
    """Cosine-similarity k-NN with votes weighted by exp(similarity / 0.07), as in DINO."""
    train_x, x = F.normalize(train_x, dim=1), F.normalize(x, dim=1)
    sims, idx = (x @ train_x.T).topk(min(k, len(train_x)), dim=1)
    votes = torch.zeros(len(x), int(train_y.max()) + 1)
    votes.scatter_add_(1, train_y[idx], (sims / 0.07).exp())
    return (votes.argmax(1) == y).float().mean().item()


def linear_probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor, epochs: int = 100
) -> float:
    """A BatchNorm (no affine) + Linear probe on frozen features, full-batch Adam."""
    torch.manual_seed(0)
    probe = torch.nn.Sequential(
        torch.nn.BatchNorm1d(train_x.shape[1], affine=False),
        torch.nn.Linear(train_x.shape[1], int(train_y.max()) + 1),
    )
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(probe(train_x), train_y).backward()
        optimizer.step()
    probe.eval()
    with torch.no_grad():
        return (probe(x).argmax(1) == y).float().mean().item()


@torch.no_grad()
def analyze_knn(cfg: DictConfig, model: torch.nn.Module, datamodule: Any) -> Dict[str, Any]:
    # The k-NN memory and the probe see training images as validation images are seen, without
    # the random crops and flips of training (as in DINO's k-NN evaluation).
    datamodule.setup("fit")
    train_images = datamodule.train_images_for_eval()
    train_x, train_y = _features(model, datamodule, train_images, cfg.num_train_images, cfg.batch_size)
    val_x, val_y = _features(model, datamodule, datamodule.val_set, cfg.num_images, cfg.batch_size)
    with torch.enable_grad():
        probe = linear_probe_accuracy(train_x, train_y, val_x, val_y)
    return {
        "knn": {"k": cfg.knn_k, "top1": knn_accuracy(train_x, train_y, val_x, val_y, cfg.knn_k)},
        "linear_probe": {"top1": probe},
        "num_train_images": len(train_x),
        "num_images": len(val_x),
    }


def run(cfg: DictConfig) -> Dict[str, Any]:
    out = Path(cfg.paths.output_dir)
    try:
        raw = load_checkpoint(cfg)
        model = load_model(cfg, raw)
        inherit_data_settings(cfg, raw)
        datamodule = build_datamodule(cfg)
        if cfg.task not in ("whitebox", "knn"):
            raise ConfigError(f"unknown task {cfg.task!r}; choose whitebox or knn")
    except USER_ERRORS as err:
        raise ConfigError(str(err).strip().splitlines()[0]) from None
    report = (
        analyze_whitebox(cfg, model, datamodule, out)
        if cfg.task == "whitebox"
        else analyze_knn(cfg, model, datamodule)
    )
    report = {
        "task": cfg.task,
        "ckpt_path": str(cfg.ckpt_path),
        "model": type(model).__name__,
        "data": to_container(cfg.data),
        **report,
    }
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report:  {path}")
    for name in report.get("figures", {}).values():
        print(f"figure:  {out / name}")
    return report


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="analyze")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as err:
        print(f"crate-analyze: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
