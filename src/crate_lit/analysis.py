"""What ``crate-analyze`` does, in the order it does it: load the checkpoint and the images it
was trained for, collect what one pass of the model over them shows, summarise it as numbers,
and write the CSV, the figures and ``report.json``.

The summaries are numbers only (no files, no matplotlib), so they can be computed and checked
without writing anything; every file and printed line comes from the write section.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import figures, measures
from .building import build_datamodule
from .configs import to_container
from .data import DATAMODULES
from .models import CrateMAE, CrateMAEClassifier, load_pretrained
from .models.factory import _unwrap as state_dict_of
from .models.factory import family_of, matching_models
from .modules import build_classifier, build_model
from .runs import read_checkpoint
from .validation import USER_ERRORS, ConfigError, error_line

# ---------------------------------------------------------------------------------------------
# loading: the checkpoint, the model it holds and the images it was trained for

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


def model_config(cfg: DictConfig, raw: Any) -> Tuple[Dict[str, Any], Optional[str]]:
    """The config of the model a checkpoint holds, and the head of a classifier checkpoint:
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
    # of a CRATE-MAE model holds the encoder inside CrateMAEClassifier, with the linear probe's
    # head or MAE fine-tuning's, not the bare CrateMAE that pre-training checkpoints and released
    # files hold.
    head = None
    if "label_smoothing" in hparams:
        head = "linear_probe" if hparams.get("linear_probe") else "classify"
    return {**model_cfg, "pretrained": None}, head


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


def load_model(model_cfg: Dict[str, Any], head: Optional[str], raw: Any, image_size: int) -> torch.nn.Module:
    """The model of ``model_cfg`` at ``image_size`` (the images it is given) with the weights
    of ``raw``; ``head``: the classifier task it was trained for (``model_config``), if any."""
    config = {**model_cfg, "img_size": image_size}
    model = build_model(config) if head is None else build_classifier(config, head == "linear_probe")
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


@dataclass
class Loaded:
    """What the analysis needs of a checkpoint: the model, the data module of the images it is
    shown, the image size it was trained at, notes for the user and Lightning's epoch."""

    model: torch.nn.Module
    datamodule: Any
    trained_size: Optional[int]
    notes: List[str]
    epoch: Optional[int]


def load(cfg: DictConfig) -> Loaded:
    """The model and data of ``cfg``, the data settings taken from the checkpoint; any mistake
    in the config or the file is one ``ConfigError`` line. The notes are printed here, before
    the pass over the images, so that they come first."""
    try:
        if cfg.task not in ("whitebox", "knn"):
            raise ConfigError(f"unknown task {cfg.task!r}; choose whitebox or knn")
        raw = load_checkpoint(cfg)
        model_cfg, head = model_config(cfg, raw)
        inherit_data_settings(cfg, raw)
        trained_size, notes = choose_image_size(cfg, model_cfg, raw)
        model = load_model(model_cfg, head, raw, int(cfg.data.image_size))
        datamodule = build_datamodule(cfg)
    except USER_ERRORS as err:
        raise ConfigError(error_line(err)) from None
    for note in notes:
        print(f"note: {note}")
    # Lightning's epoch (0-based, as in the checkpoint's file name); released files have none
    epoch = raw.get("epoch") if "pytorch-lightning_version" in raw else None
    return Loaded(model, datamodule, trained_size, notes, epoch)


# ---------------------------------------------------------------------------------------------
# collect: one pass of the model over the images


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


@dataclass
class Reconstruction:
    """A CRATE-MAE's view of the figure's images: the masked input, the decoder's output at
    every patch and the last layer's patch features (B, d, L) on the patch grid."""

    images: torch.Tensor
    masked: torch.Tensor
    output: torch.Tensor
    features: torch.Tensor
    grid_size: Tuple[int, int]


@dataclass
class Collected:
    """What the white-box pass saw: per-layer coding rates and sparsities (layers, N), every
    layer's class-token attention maps (layers, N, heads, gh, gw), the ground-truth masks
    (shapes only), the figure's images, the 0-based layer shown and, for a CRATE-MAE, its
    reconstruction of the figure's images."""

    rates: torch.Tensor
    zeros: torch.Tensor
    maps: torch.Tensor
    masks: Optional[torch.Tensor]
    shown: torch.Tensor
    layer_index: int
    reconstruction: Optional[Reconstruction]
    family: str = "CRATE"  # what the sparsity is of: CRATE's ISTA output, CRATE-alpha's code A2


@torch.no_grad()
def collect_whitebox(cfg: DictConfig, model: torch.nn.Module, datamodule: Any) -> Collected:
    """The traces' per-layer measures and attention maps of ``num_images`` validation images,
    with their ground-truth masks and the first batch's images for the figures."""
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
    reconstruction = None
    if mae_outputs is not None:
        trace, images = mae_outputs
        n = len(images)
        # the decoder's output at every patch, the visible ones too: how well it reproduces
        # what it saw is part of what it learnt (the training grid pastes them back instead)
        masked, output = model.reconstruction_images(images, trace.output[:n], trace.extras["mask"][:n])
        features = trace.layers[-1].subspace[:n, :, 1:].transpose(1, 2).flatten(2)
        reconstruction = Reconstruction(images, masked, output, features, trace.extras["grid_size"])
    return Collected(
        rates=torch.cat(rates, dim=1),
        zeros=torch.cat(zeros, dim=1),
        maps=torch.cat(maps, dim=1),
        masks=torch.cat(gt_masks) if gt_masks else None,
        shown=shown,
        layer_index=layer_index,
        reconstruction=reconstruction,
        family=family_of(model),
    )


@torch.no_grad()
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


def collect_features(
    cfg: DictConfig, model: torch.nn.Module, datamodule: Any
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen features and labels of ``num_train_images`` training images (the k-NN memory and
    the probe's training set) and of ``num_images`` validation images."""
    # The k-NN memory and the probe see training images as validation images are seen, without
    # the random crops and flips of training (as in DINO's k-NN evaluation).
    datamodule.setup("fit")
    train_images = datamodule.train_images_for_eval()
    train_x, train_y = _features(model, datamodule, train_images, cfg.num_train_images, cfg.batch_size)
    val_x, val_y = _features(model, datamodule, datamodule.val_set, cfg.num_images, cfg.batch_size)
    return train_x, train_y, val_x, val_y


# ---------------------------------------------------------------------------------------------
# summarise: the numbers of report.json

# what report.json keeps of the segmentation score of every layer
_LAYER_KEYS = ("best_head", "best_head_iou", "union_iou")


@torch.no_grad()
def summarise_whitebox(cfg: DictConfig, seen: Collected) -> Dict[str, Any]:
    """Layer-wise coding rate and sparsity, the layer shown, the number of images and, with
    ground-truth masks, the segmentation score of the layer shown and of every layer."""
    stats = measures.summarize_layers(seen.rates, seen.zeros)
    numbers: Dict[str, Any] = {
        "layerwise": stats,
        "attention_layer": seen.layer_index + 1,
        "num_images": int(seen.maps[seen.layer_index].shape[0]),
    }
    if seen.masks is not None:
        # every layer with the same rule: shows where in depth the object emerges
        scores = [measures.segmentation_scores(m, seen.masks, cfg.keep, cfg.upsample) for m in seen.maps]
        numbers["segmentation"] = dict(scores[seen.layer_index])
        by_layer = [{"layer": i + 1, **{k: s[k] for k in _LAYER_KEYS}} for i, s in enumerate(scores)]
        numbers["segmentation"]["by_layer"] = by_layer
    return numbers


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


def summarise_knn(
    cfg: DictConfig, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor
) -> Dict[str, Any]:
    """k-NN and linear-probe top-1 accuracy of the validation features."""
    with torch.enable_grad():  # the probe is trained, whatever the caller's grad mode
        probe = linear_probe_accuracy(train_x, train_y, val_x, val_y)
    return {
        "knn": {"k": cfg.knn_k, "top1": knn_accuracy(train_x, train_y, val_x, val_y, cfg.knn_k)},
        "linear_probe": {"top1": probe},
        "num_train_images": len(train_x),
        "num_images": len(val_x),
    }


# ---------------------------------------------------------------------------------------------
# write: layerwise.csv, the figures, report.json and the printed lines


@torch.no_grad()
def write_whitebox(
    cfg: DictConfig,
    seen: Collected,
    numbers: Dict[str, Any],
    datamodule: Any,
    out: Path,
    epoch: Optional[int] = None,
) -> Dict[str, Any]:
    """``layerwise.csv`` and the figures of the white-box pass into ``out``; ``epoch`` (a
    crate-lit checkpoint's) goes into the figures' titles beside the checkpoint's file name.
    Returns the white-box part of the report: ``numbers`` with the figures' file names."""
    stats = numbers["layerwise"]
    with open(out / "layerwise.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(stats[0]))
        writer.writeheader()
        writer.writerows(stats)
    figures.plot_layerwise(stats, out / "layerwise.png", seen.family)
    shown, layer_index = seen.shown, seen.layer_index
    figure_maps = seen.maps[layer_index][: len(shown)]
    # the figure shows exactly the masks that are scored
    figure_masks = measures.attention_masks(figure_maps, shown.shape[-2:], cfg.keep, cfg.upsample)
    source = Path(str(cfg.ckpt_path)).name
    figures.plot_attention_grid(
        figures.denormalize(shown, datamodule),
        figure_maps,
        figure_masks,
        out / "attention.png",
        layer=layer_index + 1,
        depth=len(seen.maps),
        source=source,
        epoch=epoch,
        mask_rule=f"keep {cfg.keep:g}, {cfg.upsample}",
    )
    files = {"layerwise": "layerwise.png", "attention": "attention.png"}
    rec = seen.reconstruction
    if rec is not None:
        figures.plot_reconstructions(
            figures.denormalize(rec.images, datamodule),
            figures.denormalize(rec.masked, datamodule),
            figures.denormalize(rec.output, datamodule),
            out / "decoder_output.png",
            visible_pasted=False,
            mask_ratio=cfg.mask_ratio,
            source=source,
            epoch=epoch,
        )
        pca = measures.pca_feature_maps(rec.features, rec.grid_size)
        figures.plot_pca_maps(figures.denormalize(rec.images, datamodule), pca, out / "pca.png")
        files.update({"decoder_output": "decoder_output.png", "pca": "pca.png"})
    # report.json's order: the figures follow the counts, the segmentation scores follow them
    head = ("layerwise", "attention_layer", "num_images")
    return {
        **{k: numbers[k] for k in head},
        "figures": files,
        **{k: v for k, v in numbers.items() if k not in head},
    }


def write_report(cfg: DictConfig, loaded: Loaded, results: Dict[str, Any], out: Path) -> Dict[str, Any]:
    """``report.json``: what was analysed (checkpoint, model, data, notes), then ``results``;
    prints its path and the figures'. Returns the report."""
    model = loaded.model
    report = {
        "task": cfg.task,
        "ckpt_path": str(cfg.ckpt_path),
        "model": model_name(model),
        "model_class": type(model).__name__,
        "model_image_size": loaded.trained_size,
        "data": to_container(cfg.data),
        **({"notes": loaded.notes} if loaded.notes else {}),
        **results,
    }
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report:  {path}")
    for name in report.get("figures", {}).values():
        print(f"figure:  {out / name}")
    return report
