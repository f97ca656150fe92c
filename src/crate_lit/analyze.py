"""``crate-analyze``: white-box measurements of a trained CRATE or CRATE-MAE.

``crate-analyze ckpt_path=PATH data=shapes`` writes, into its own run folder, the layer-wise
coding rate and sparsity (CSV + figure), class-token attention maps of every head with their
DINO-style masks, for CRATE-MAE the decoder's output at every patch and PCA feature maps, on
``data=shapes`` the segmentation score against the ground-truth masks, and ``report.json`` with
every number. A model is analysed at the image size it was trained at unless
``data.image_size`` is given.
``task=knn`` instead measures k-NN and linear-probe accuracy on frozen features.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import figures, measures
from .building import build_datamodule
from .configs import run_command, to_container
from .data import DATAMODULES
from .models import CrateMAE, CrateMAEClassifier, load_pretrained
from .models.factory import _unwrap as state_dict_of
from .models.factory import matching_models
from .modules import build_classifier, build_model
from .runs import config_dir, read_checkpoint
from .validation import USER_ERRORS, ConfigError, error_line

log = logging.getLogger("crate_lit.analyze")

# what report.json keeps of the segmentation score of every layer
_LAYER_KEYS = ("best_head", "best_head_iou", "union_iou")


# DataLoader settings are crate-analyze's own, whatever the training run used
_LOADER_KEYS = ("batch_size", "num_workers", "pin_memory", "persistent_workers", "cache_dir", "decode")


def load_checkpoint(cfg: DictConfig) -> Dict[str, Any]:
    path = Path(str(cfg.ckpt_path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={path} does not exist; point it at a .ckpt or released .pth file")
    return read_checkpoint(path, resuming=False)


def _given_on_command_line() -> set:
    """The keys set by this run's command-line overrides (``data.image_size``, ...)."""
    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


# data settings that older checkpoints do not save, with the value their runs used (the data
# module's default of the time, since changed to the shipped config's)
_BEFORE_SAVED = {"shapes": {"shape_scale": (0.5, 0.9)}}


def inherit_data_settings(cfg: DictConfig, raw: Any) -> List[str]:
    """Analyse the images the model was trained for: a crate-lit checkpoint's data settings
    (image size, classes, shape scale...) replace the data config's, except those given on the
    command line and the loader settings. A setting the checkpoint predates takes the value its
    run used: the data module's default, or ``_BEFORE_SAVED``'s where that default has changed.
    Applies only when the checkpoint's data module takes arguments of ``data=``'s (e.g. a shapes
    run analysed with ``data=shapes``).
    Returns the keys taken from the checkpoint."""
    saved = raw.get("datamodule_hyper_parameters") if isinstance(raw, dict) else None
    if not saved or not set(saved) <= set(cfg.data) - {"name"}:
        return []
    settings = {}  # the data module's defaults, then what the checkpoint saved
    if cfg.data.name in DATAMODULES:
        for name, param in inspect.signature(DATAMODULES[cfg.data.name]).parameters.items():
            if name in cfg.data and param.default is not param.empty:
                settings[name] = param.default
        settings.update(_BEFORE_SAVED.get(cfg.data.name, {}))
    settings.update(saved)
    given = _given_on_command_line()
    taken = [k for k in settings if k not in _LOADER_KEYS and f"data.{k}" not in given]
    for key in taken:
        value = settings[key]
        cfg.data[key] = list(value) if isinstance(value, tuple) else value
    return taken


def model_config(cfg: DictConfig, raw: Any) -> Tuple[Dict[str, Any], bool]:
    """The config of the model a checkpoint holds, and whether it is a classifier checkpoint:
    crate-lit checkpoints name their model in their hyper-parameters; for a released file,
    ``model=NAME`` (e.g. ``model=crate_small``) says which to build."""
    path = Path(str(cfg.ckpt_path)).expanduser()
    hparams = (raw.get("hyper_parameters") or {}) if isinstance(raw, dict) else {}
    model_cfg = hparams.get("model")
    if model_cfg is None:
        if not cfg.get("model"):
            raise ConfigError(f"{path} does not name its model; add model=NAME (e.g. model=crate_small)")
        model_cfg = to_container(cfg.model)
    # A classification checkpoint (CrateClassifier's hyper-parameters include label_smoothing)
    # of a CRATE-MAE model holds the encoder inside CrateMAEClassifier (the linear probe), not
    # the bare CrateMAE that pre-training checkpoints and released files hold.
    return {**model_cfg, "pretrained": None}, "label_smoothing" in hparams


def trained_grid(raw: Any) -> Optional[int]:
    """The side of the square patch grid the checkpoint's position table was trained for (a
    released file states its image size nowhere else), or None when it has no such table."""
    try:
        state = state_dict_of(raw)
    except ValueError:
        return None  # load_pretrained says what is wrong with it
    table = next(
        (v for k, v in state.items() if k.rsplit(".", 1)[-1] in ("pos_embed", "pos_embedding")), None
    )
    if table is None or table.dim() != 3:
        return None
    side = math.isqrt(table.shape[1] - 1)  # the class token's row first
    return side if side * side == table.shape[1] - 1 else None


def choose_image_size(
    cfg: DictConfig, model_cfg: Dict[str, Any], raw: Any
) -> Tuple[Optional[int], List[str]]:
    """Analyse a model at the image size it was trained at: a data config's own size (48 px on
    data=shapes) would feed a released 224 px model images a fifth of the size it knows, on a
    position table resampled to a few patches. The model's size replaces ``data.image_size``
    unless the command line gives one, which is kept (and said to be another size).
    Returns the model's trained size (None when not known) and notes for the user."""
    patch = model_cfg.get("patch_size")
    grid = trained_grid(raw)
    trained = grid * int(patch) if grid and patch else None
    if trained is None or int(cfg.data.image_size) == trained:
        return trained, []
    size, patch = int(cfg.data.image_size), int(patch)
    if "data.image_size" in _given_on_command_line():
        new = size // patch
        return trained, [
            f"analysing at data.image_size={size} as given; the model was trained at {trained} px, "
            f"its position table is resampled from {grid} x {grid} to {new} x {new} patches"
        ]
    cfg.data.image_size = trained
    return trained, [
        f"analysing at data.image_size={trained}, the size the model was trained at ({grid} x {grid} "
        f"patches of {patch} px), not data={cfg.data.name}'s {size} px; "
        "give data.image_size= to choose another"
    ]


def load_model(model_cfg: Dict[str, Any], classifier: bool, raw: Any, image_size: int) -> torch.nn.Module:
    """The model of ``model_cfg`` at ``image_size`` (the images it is given) with the weights
    of ``raw``."""
    build = build_classifier if classifier else build_model
    model = build({**model_cfg, "img_size": image_size})
    load_pretrained(model, raw)
    return model.eval()


def model_name(model: torch.nn.Module) -> str:
    """The ``create_model`` name of ``model``'s width, depth and patch size (a probe is named by
    its encoder), or its shape in words when no named model has it."""
    net = model.encoder if isinstance(model, CrateMAEClassifier) else model
    names = matching_models(net.state_dict())
    if names:
        return names[0]
    shape = f"width {net.embed_dim}, depth {len(net.blocks)}, {net.blocks[0].mssa.num_heads} heads"
    return f"{type(net).__name__} of {shape}, {net.patch_embed.patch_size} px patches"


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
def analyze_whitebox(
    cfg: DictConfig, model: torch.nn.Module, datamodule: Any, out: Path, epoch: Optional[int] = None
) -> Dict[str, Any]:
    """The white-box figures and numbers of ``model``; ``epoch`` (a crate-lit checkpoint's)
    goes into the figures' titles beside the checkpoint's file name."""
    rates, zeros = [], []
    maps, gt_masks, shown = [], [], None
    is_mae = isinstance(model, CrateMAE)
    mae_outputs = None
    for images, _, masks in _batches(cfg, datamodule):
        trace = model.trace(images, mask_ratio=cfg.mask_ratio) if is_mae else model.trace(images)
        batch_rates, batch_zeros = measures.layer_measures(trace)
        rates.append(batch_rates)
        zeros.append(batch_zeros)
        grid = trace.extras["grid_size"]
        # every layer's maps (layers, B, heads, gh, gw): the shapes report scores each layer
        maps.append(torch.stack([measures.cls_attention_maps(t.attention, grid) for t in trace.layers]))
        if masks is not None:
            gt_masks.append(masks)
        if shown is None:  # the first batch
            layer_index = _layer_index(cfg.layer, len(trace.layers))
            shown = images[: cfg.num_figure_images]
            if is_mae:
                mae_outputs = (trace, images[: cfg.num_figure_images])
    stats = measures.summarize_layers(torch.cat(rates, dim=1), torch.cat(zeros, dim=1))
    with open(out / "layerwise.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(stats[0]))
        writer.writeheader()
        writer.writerows(stats)
    figures.plot_layerwise(stats, out / "layerwise.png")
    maps_by_layer = torch.cat(maps, dim=1)
    maps_all = maps_by_layer[layer_index]
    figure_maps = maps_all[: len(shown)]
    # the figure shows exactly the masks that are scored
    figure_masks = measures.attention_masks(figure_maps, shown.shape[-2:], cfg.keep, cfg.upsample)
    source = Path(str(cfg.ckpt_path)).name
    figures.plot_attention_grid(
        figures.denormalize(shown, datamodule),
        figure_maps,
        figure_masks,
        out / "attention.png",
        layer=layer_index + 1,
        depth=len(maps_by_layer),
        source=source,
        epoch=epoch,
        mask_rule=f"keep {cfg.keep:g}, {cfg.upsample}",
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
        scores = [measures.segmentation_scores(m, gt, cfg.keep, cfg.upsample) for m in maps_by_layer]
        report["segmentation"] = dict(scores[layer_index])
        by_layer = [{"layer": i + 1, **{k: s[k] for k in _LAYER_KEYS}} for i, s in enumerate(scores)]
        report["segmentation"]["by_layer"] = by_layer
    if mae_outputs is not None:
        trace, images = mae_outputs
        n = len(images)
        # the decoder's output at every patch, the visible ones too: how well it reproduces
        # what it saw is part of what it learnt (the training grid pastes them back instead)
        masked, output = model.reconstruction_images(images, trace.output[:n], trace.extras["mask"][:n])
        figures.plot_reconstructions(
            figures.denormalize(images, datamodule),
            figures.denormalize(masked, datamodule),
            figures.denormalize(output, datamodule),
            out / "decoder_output.png",
            visible_pasted=False,
            mask_ratio=cfg.mask_ratio,
            source=source,
            epoch=epoch,
        )
        features = trace.layers[-1].subspace[:n, :, 1:].transpose(1, 2).flatten(2)
        pca = measures.pca_feature_maps(features, trace.extras["grid_size"])
        figures.plot_pca_maps(figures.denormalize(images, datamodule), pca, out / "pca.png")
        report["figures"].update({"decoder_output": "decoder_output.png", "pca": "pca.png"})
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
        if cfg.task not in ("whitebox", "knn"):
            raise ConfigError(f"unknown task {cfg.task!r}; choose whitebox or knn")
        raw = load_checkpoint(cfg)
        model_cfg, classifier = model_config(cfg, raw)
        inherit_data_settings(cfg, raw)
        trained_size, notes = choose_image_size(cfg, model_cfg, raw)
        model = load_model(model_cfg, classifier, raw, int(cfg.data.image_size))
        datamodule = build_datamodule(cfg)
    except USER_ERRORS as err:
        raise ConfigError(error_line(err)) from None
    for note in notes:
        print(f"note: {note}")
    # Lightning's epoch (0-based, as in the checkpoint's file name); released files have none
    epoch = raw.get("epoch") if "pytorch-lightning_version" in raw else None
    report = (
        analyze_whitebox(cfg, model, datamodule, out, epoch)
        if cfg.task == "whitebox"
        else analyze_knn(cfg, model, datamodule)
    )
    report = {
        "task": cfg.task,
        "ckpt_path": str(cfg.ckpt_path),
        "model": model_name(model),
        "model_class": type(model).__name__,
        "model_image_size": trained_size,
        "data": to_container(cfg.data),
        **({"notes": notes} if notes else {}),
        **report,
    }
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report:  {path}")
    for name in report.get("figures", {}).values():
        print(f"figure:  {out / name}")
    return report


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="analyze")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as err:
        print(f"crate-analyze: error: {err}", file=sys.stderr)
        sys.exit(2)


EXAMPLES = (
    "crate-analyze ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt   # a crate-lit run's checkpoint",
    "crate-analyze ckpt_path=/ckpt/CRATE_small.pth model=crate_small        # a released file",
    "crate-analyze ckpt_path=<ckpt> task=knn data=imagenet data.root=/data/imagenet",
)


def main() -> None:
    """The ``crate-analyze`` command: its own ``--help``, one line for a mistyped group option or
    key, then Hydra composes the config and ``run`` analyses."""
    about = "White-box measurements and figures of a CRATE checkpoint (crate-lit's or a released one)."
    run_command("crate-analyze", "analyze", about, EXAMPLES, _hydra_main)


if __name__ == "__main__":
    main()
