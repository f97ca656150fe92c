"""Build models by name, load released or crate-lit weights into them, and export back."""

from __future__ import annotations

import difflib
import inspect
import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import crate, crate_alpha, crate_mae
from .crate import CRATE_CONFIGS, Crate
from .crate_alpha import CRATE_ALPHA_CONFIGS, CrateAlpha
from .crate_mae import CRATE_MAE_CONFIGS, CrateMAE, CrateMAEClassifier

log = logging.getLogger(__name__)

# each family's size table and the class its named models are
FAMILIES: Dict[str, tuple] = {
    "CRATE": (CRATE_CONFIGS, Crate),
    "CRATE-alpha": (CRATE_ALPHA_CONFIGS, CrateAlpha),
    "CRATE-MAE": (CRATE_MAE_CONFIGS, CrateMAE),
}
MODEL_NAMES = tuple(name for table, _ in FAMILIES.values() for name in table)
CLASSIFIER_NAMES = tuple(CRATE_CONFIGS) + tuple(CRATE_ALPHA_CONFIGS)


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model."""


@dataclass
class LoadResult:
    """What ``load_pretrained`` did beyond a plain copy."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    dropped_head: List[str] = field(default_factory=list)
    resampled: List[str] = field(default_factory=list)
    reinitialised: List[str] = field(default_factory=list)
    released_layout: bool = False


def family(name: str) -> str:
    """``CRATE``, ``CRATE-alpha`` or ``CRATE-MAE``: the family of a named model."""
    for key, (table, _) in FAMILIES.items():
        if name in table:
            return key
    raise ValueError(f"unknown model {name!r}")


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a named model (``crate_tiny`` ... ``crate_large``, ``*_patch8``, ``crate_alpha_*``,
    ``mae_crate_*``, and the CPU-sized ``*_mini`` / ``*_micro``); keyword arguments override its
    config."""
    if name in CRATE_CONFIGS:
        return getattr(crate, name)(**overrides)
    if name in CRATE_ALPHA_CONFIGS:
        return getattr(crate_alpha, name)(**overrides)
    if name in CRATE_MAE_CONFIGS:
        return CrateMAE(**{**CRATE_MAE_CONFIGS[name], **overrides})
    close = difflib.get_close_matches(name, MODEL_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown model {name!r}{hint}; available: {', '.join(MODEL_NAMES)}")


# How a file written by ``torch.save`` begins: a zip archive (the format since PyTorch 1.6), or in
# the legacy format the pickled magic number (a 10-byte long after the pickle protocol header).
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def torch_file_format(path: Union[str, Path]) -> str | None:
    """``"zip"`` or ``"legacy"`` for a file that ``torch.save`` wrote, None for any other file;
    from its first bytes, so that a text or random file is named as such instead of being handed
    to the unpickler (whose errors, e.g. ``KeyError: 101``, say nothing about the file)."""
    with open(path, "rb") as handle:
        head = handle.read(32)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head:
        return "legacy"
    return None


def read_torch_file(path: Union[str, Path], label: str, give: str, objects: str | None = None) -> Any:
    """What ``torch.save`` wrote to ``path``, read to the CPU, memory-mapped when it is a zip
    archive (nothing is read that is not used; the legacy format of older released files cannot
    be mapped). A file that is no PyTorch file, is damaged, or holds Python objects beyond tensors
    and plain containers is one :class:`CheckpointMismatchError` line that begins with ``label``
    (how the user named the file, e.g. ``ckpt_path=...``); ``give`` says what to give instead of
    a file that is none. Such objects are unpickled, which can run code, only where ``objects``
    is None (a checkpoint being resumed, read as Lightning itself would read it); otherwise the
    file is refused with ``objects`` as the advice."""
    kind = torch_file_format(path)
    if kind is None:
        raise CheckpointMismatchError(
            f"{label} is not a PyTorch checkpoint (neither a torch.save zip archive nor its legacy "
            f"format); {give}"
        )
    mmap, refused = kind == "zip", None
    try:
        if mmap and not zipfile.is_zipfile(path):  # cut short: torch.load would say "Invalid argument"
            raise EOFError("a zip archive without its end")
        try:
            return torch.load(str(path), map_location="cpu", mmap=mmap, weights_only=True)
        except pickle.UnpicklingError as err:
            if objects is None:
                return torch.load(str(path), map_location="cpu", mmap=mmap, weights_only=False)
            if "GLOBAL" not in str(err):  # no object's class was refused: the pickle is damaged
                raise
            refused = _load_error(err)
    except Exception as err:  # a damaged file fails in many ways (zip, pickle, unicode, storage)
        raise CheckpointMismatchError(
            f"{label} cannot be read as a checkpoint ({_load_error(err)}); it is damaged (truncated or "
            "altered), not a readable PyTorch checkpoint"
        ) from None
    raise CheckpointMismatchError(
        f"{label} holds objects other than tensors and plain containers ({refused}), which are not "
        f"unpickled here (that could run code); {objects}"
    )


def _load_error(err: BaseException) -> str:
    """The first sentence of what a ``torch.load`` error says is wrong. Not the first line, as
    elsewhere: torch puts the weights-only unpickler's own words (``Unsupported global: ...``,
    ``Unsupported operand 127``) after lines of advice (e.g. to pass weights_only=False, which a
    one-line error must not repeat) and before a pointer to the docs; every such line names
    weights_only."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        lines = [line for line in lines if "weights_only" not in line] or lines
        lines = [lines[-1].removeprefix("Weights only load failed. ").split("WeightsUnpickler error: ")[-1]]
    return lines[0].split(". ", 1)[0].rstrip(".") if lines else type(err).__name__


def _is_npz(path: Path) -> bool:
    """Whether ``path`` is a numpy .npz archive (arrays by name; the JAX releases' format), which
    begins as a torch.save zip archive does."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return bool(names) and all(name.endswith(".npy") for name in names)


def read_weights_file(path: Union[str, Path], label: str, give: str, objects: str | None = None) -> Any:
    """``read_torch_file``, or for a numpy .npz (the JAX releases' format) its arrays as tensors
    by name (never unpickled: numpy refuses object arrays here)."""
    if not _is_npz(Path(path)):
        return read_torch_file(path, label, give, objects)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {name: torch.from_numpy(arrays[name]) for name in arrays.files}
    except Exception as err:  # a damaged archive fails in zip, numpy or dtype code
        raise CheckpointMismatchError(
            f"{label} cannot be read as a .npz of arrays ({_load_error(err)}); it is damaged, or holds "
            "objects other than arrays"
        ) from None


def _read(source: Union[str, Path]) -> Any:
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; check the path (model.pretrained=...)")
    return read_weights_file(
        path,
        str(path),
        "give a released .pth or a crate-lit .ckpt",
        "if you trust the file, load it with torch.load(path, weights_only=False) and pass the "
        "resulting state dict",
    )


def _unwrap(obj: Any) -> Dict[str, Tensor]:
    """The state dict inside a released file, a community file or a Lightning checkpoint."""
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    lightning = "pytorch-lightning_version" in obj
    for key in ("state_dict", "model", "module"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if lightning:  # the LightningModule keeps the network under ``model.``
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    for prefix in ("module.", "_orig_mod.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    if not state:
        raise CheckpointMismatchError("the checkpoint holds no tensors")
    return state


def _architecture(state: Dict[str, Tensor]) -> tuple[str, int | None, int, int | None]:
    """(family, width, depth, patch size) of a state dict, read from its shapes; released key
    names are mapped first, so a file of any family is read whichever model it was given to."""
    if crate_alpha.is_jax_layout(state):
        state = crate_alpha.from_jax(state)
    for table in (crate.RELEASED_KEYS, crate_mae.RELEASED_KEYS, crate_alpha.RELEASED_KEYS):
        state = crate.rename_keys(state, table)
    proj = state.get("patch_embed.proj.weight")
    if any(k.startswith("decoder_blocks.") for k in state):
        family = "CRATE-MAE"
    elif proj is not None and proj.dim() == 4:  # a convolution without a decoder: CRATE-alpha's stem
        family = "CRATE-alpha"
    else:
        family = "CRATE"
    width = next((int(v.shape[-1]) for k, v in state.items() if k.endswith("cls_token")), None)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    patch = None
    if proj is not None and proj.dim() == 4:  # a convolution (width, channels, p, p)
        patch = int(proj.shape[-1])
    elif proj is not None and proj.dim() == 2:  # CRATE: a linear map of flattened RGB patches
        side = round((int(proj.shape[1]) / 3) ** 0.5)
        patch = side if 3 * side * side == proj.shape[1] else None
    return family, width, depth, patch


def named_config(name: str) -> Dict[str, Any]:
    """The architecture a named model is built with: its size-table entry (``CRATE_CONFIGS``,
    ``CRATE_ALPHA_CONFIGS``, ``CRATE_MAE_CONFIGS``) over its constructor's defaults (e.g. a
    patch size the table leaves out)."""
    table, builder = FAMILIES[family(name)]
    defaults = {key: p.default for key, p in inspect.signature(builder).parameters.items()}
    return {**defaults, **table[name]}


def _describe(arch: tuple) -> str:
    family, width, depth, patch = arch
    return f"{family} checkpoint of width {width}, depth {depth}" + (f", patch {patch}" if patch else "")


def _matching(arch: tuple) -> List[str]:
    kind, width, depth, patch = arch
    configs = {name: named_config(name) for name in FAMILIES[kind][0]}
    return [
        name
        for name, c in configs.items()
        if (c["embed_dim"], c["depth"]) == (width, depth) and patch in (None, c["patch_size"])
    ]


def matching_models(state: Dict[str, Tensor]) -> List[str]:
    """The named models (``MODEL_NAMES``) whose width, depth and patch size are the state dict's."""
    return _matching(_architecture(state))


def _fit_hint(model: nn.Module, state: Dict[str, Tensor], misshaped: bool) -> str:
    """Which model the checkpoint is for, where that is not ``model``: ``strict=False`` skips
    missing and unexpected keys only, so it cannot help a checkpoint of another size."""
    arch = _architecture(state)
    _, width, depth, patch = arch
    description = _describe(arch)
    own = (family_of(model), model.embed_dim, len(model.blocks))
    if arch[:3] == own and patch in (None, model.patch_embed.patch_size):
        skip = "" if misshaped else "; pass strict=False to skip the missing and unexpected keys"
        return f"It is a {description}, the model's own size{skip}"
    names = _matching(arch)
    if names:
        return (
            f"It is a {description}, which is {' or '.join(names)}: build that model "
            f"(create_model({names[0]!r}); on the command line model={names[0]})"
        )
    return (
        f"It is a {description}, which none of the named models (MODEL_NAMES) is: build one of "
        f"that size (on the command line model.embed_dim={width} model.depth={depth}"
        + (f" model.patch_size={patch})" if patch else ")")
    )


def family_of(model: nn.Module) -> str:
    """``CRATE``, ``CRATE-alpha`` or ``CRATE-MAE``: the family of a crate-lit model (a classifier
    on a CRATE-MAE encoder is its encoder's)."""
    if isinstance(model, CrateMAEClassifier):
        model = model.encoder
    # the most derived first: CrateAlpha is a Crate
    for kind in ("CRATE-alpha", "CRATE-MAE", "CRATE"):
        if isinstance(model, FAMILIES[kind][1]):
            return kind
    raise TypeError(f"a crate-lit model is needed, got {type(model).__name__}")


def _summary(label: str, keys: List[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"{len(keys)} {label} [{shown}]"


def load_pretrained(
    model: nn.Module, source: Union[str, Path, Mapping[str, Any]], *, strict: bool = True
) -> LoadResult:
    """Load weights into ``model`` from a file path or a state dict in any released layout
    (bare, under ``state_dict`` or ``model``, with or without ``module.``; crate-lit's own
    Lightning checkpoints too; CRATE-alpha's JAX .npz too). Released key names are mapped, the
    classifier head is dropped when the class count differs, the position table follows the
    model's grid, and a CRATE-alpha patch embedding of another patch size is left to the model's
    own initialisation (``LoadResult.reinitialised``).

    Missing, unexpected or mis-shaped keys raise one :class:`CheckpointMismatchError` that
    lists them; with ``strict=False`` missing and unexpected keys are logged and skipped.
    """
    raw = _read(source) if isinstance(source, (str, Path)) else source
    state = _unwrap(raw)
    if isinstance(model, CrateMAEClassifier):
        return _load_probe(model, state, strict)
    result = LoadResult()
    found = state  # as the file has it, for naming the model it fits
    before = {k: tuple(v.shape) for k, v in state.items() if k in ("pos_embed", "pos_embedding")}
    if "pos_embedding" in before:
        before["pos_embed"] = before.pop("pos_embedding")
    before.update({k: tuple(v.shape) for k, v in state.items() if k == "decoder_pos_embed"})
    if isinstance(model, Crate):
        alpha = isinstance(model, CrateAlpha)
        if alpha:
            result.released_layout = crate_alpha.is_jax_layout(state) or any(
                m in k for k in state for m in crate_alpha.RELEASED_MARKERS
            )
            state = crate_alpha.checkpoint_filter_fn(state, model)
            if "patch_embed.proj.weight" not in state and "patch_embed.proj.bias" in state:
                result.reinitialised = ["patch_embed.proj.weight"]  # another patch size
        else:
            result.released_layout = any(k.startswith(crate.RELEASED_MARKERS) for k in state)
            state = crate.checkpoint_filter_fn(state, model)
        head_keys = [k for k in state if k.startswith(("head.", "head_norm."))]
        head = state.get("head.weight")
        if head is not None and (model.num_classes == 0 or head.shape[0] != model.num_classes):
            # a new task: CRATE's released recipe trains a new head, LN included; CRATE-alpha's
            # fine-tuning keeps the LN (its JAX recipe reloads everything but head/kernel and bias)
            keep_norm = alpha or not model.num_classes
            dropped = [k for k in head_keys if k.startswith("head.")] if keep_norm else head_keys
            result.dropped_head = sorted(dropped)
            state = {k: v for k, v in state.items() if k not in dropped}
    elif isinstance(model, CrateMAE):
        result.released_layout = any(m in k for k in state for m in crate_mae.RELEASED_MARKERS)
        state = crate_mae.checkpoint_filter_fn(state, model)
    else:
        raise TypeError(f"load_pretrained takes a crate-lit model, got {type(model).__name__}")

    own = model.state_dict()
    result.resampled = [
        name
        for name in ("pos_embed", "decoder_pos_embed")
        if name in before and name in own and before[name] != tuple(own[name].shape)
    ]
    missing = sorted(
        k for k in own if k not in state and not _is_new_head(k, result) and k not in result.reinitialised
    )
    unexpected = sorted(k for k in state if k not in own)
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    )
    problems = []
    if missing and strict:
        problems.append(_summary("missing", missing))
    if unexpected and strict:
        problems.append(_summary("unexpected", unexpected))
    if misshaped:
        problems.append(_summary("mis-shaped", misshaped, limit=3))
    if problems:
        label = str(source) if isinstance(source, (str, Path)) else "checkpoint"
        raise CheckpointMismatchError(
            f"{label} does not fit {type(model).__name__}: {'; '.join(problems)}. "
            f"{_fit_hint(model, found, bool(misshaped))}"
        )
    if missing or unexpected:
        log.warning(
            "load_pretrained skipped %s; %s", _summary("missing", missing), _summary("unexpected", unexpected)
        )
    result.missing, result.unexpected = missing, unexpected
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return result


def _load_probe(model: CrateMAEClassifier, state: Dict[str, Tensor], strict: bool) -> LoadResult:
    """An MAE checkpoint goes into the encoder (the probe head stays new); a checkpoint of a
    probe itself also brings its head when the class count matches."""
    if not any(k.startswith("encoder.") for k in state):
        result = load_pretrained(model.encoder, state, strict=strict)
        result.dropped_head = ["head"]
        return result
    result = load_pretrained(
        model.encoder,
        {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")},
        strict=strict,
    )
    head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    own = model.head.state_dict()
    if head.keys() == own.keys() and all(head[k].shape == own[k].shape for k in own):
        model.head.load_state_dict(head)
    else:
        result.dropped_head = sorted(f"head.{k}" for k in head)
    return result


def _is_new_head(key: str, result: LoadResult) -> bool:
    return key in result.dropped_head or (
        bool(result.dropped_head) and key.startswith(("head.", "head_norm."))
    )


def to_released_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """crate-lit weights under the released key names, loadable by the original code."""
    state = model.state_dict()
    if isinstance(model, CrateAlpha):
        return crate_alpha.to_released(state)
    if isinstance(model, Crate):
        return crate.to_released(state)
    if isinstance(model, CrateMAE):
        return crate_mae.to_released(state)
    raise TypeError(f"to_released_state_dict takes a crate-lit model, got {type(model).__name__}")
