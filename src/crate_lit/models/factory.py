"""Build models by name, load released or crate-lit weights into them, and export back."""

from __future__ import annotations

import difflib
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Union

import torch
from torch import Tensor, nn

from . import crate, crate_mae
from .crate import CRATE_CONFIGS, Crate
from .crate_mae import CRATE_MAE_CONFIGS, CrateMAE, CrateMAEClassifier

log = logging.getLogger(__name__)

MODEL_NAMES = tuple(CRATE_CONFIGS) + tuple(CRATE_MAE_CONFIGS)


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model."""


@dataclass
class LoadResult:
    """What ``load_pretrained`` did beyond a plain copy."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    dropped_head: List[str] = field(default_factory=list)
    resampled: List[str] = field(default_factory=list)
    released_layout: bool = False


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a named model (``crate_tiny`` ... ``crate_large``, ``*_patch8``, ``mae_crate_*``,
    and the CPU-sized ``crate_mini`` / ``crate_micro``); keyword arguments override its config."""
    if name in CRATE_CONFIGS:
        return getattr(crate, name)(**overrides)
    if name in CRATE_MAE_CONFIGS:
        return CrateMAE(**{**CRATE_MAE_CONFIGS[name], **overrides})
    close = difflib.get_close_matches(name, MODEL_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown model {name!r}{hint}; available: {', '.join(MODEL_NAMES)}")


def _read(source: Union[str, Path]) -> Any:
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; check the path (model.pretrained=...)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointMismatchError(
            f"{path} holds Python objects that torch.load(weights_only=True) refuses "
            f"({str(err).splitlines()[0]}); if you trust the file, load it with "
            "torch.load(path, weights_only=False) and pass the resulting state dict"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointMismatchError(
            f"{path} is not a readable PyTorch checkpoint ({str(err).splitlines()[0]})"
        ) from None


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


def _describe(state: Dict[str, Tensor]) -> str:
    width = next((v.shape[-1] for k, v in state.items() if k.endswith("cls_token")), None)
    layers = {k.split(".")[1] for k in state if k.startswith(("blocks.", "transformer.layers."))}
    layers |= {k.split(".")[2] for k in state if k.startswith("transformer.layers.")}
    depth = len({x for x in layers if x.isdigit()})
    family = "CRATE-MAE" if any("decoder_blocks" in k for k in state) else "CRATE"
    return f"{family} checkpoint of width {width}, depth {depth}"


def _summary(label: str, keys: List[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"{len(keys)} {label} [{shown}]"


def load_pretrained(
    model: nn.Module, source: Union[str, Path, Mapping[str, Any]], *, strict: bool = True
) -> LoadResult:
    """Load weights into ``model`` from a file path or a state dict in any released layout
    (bare, under ``state_dict`` or ``model``, with or without ``module.``; crate-lit's own
    Lightning checkpoints too). Released key names are mapped, the classifier head is
    dropped when the class count differs, and the position table follows the model's grid.

    Missing, unexpected or mis-shaped keys raise one :class:`CheckpointMismatchError` that
    lists them; with ``strict=False`` missing and unexpected keys are logged and skipped.
    """
    raw = _read(source) if isinstance(source, (str, Path)) else source
    state = _unwrap(raw)
    if isinstance(model, CrateMAEClassifier):
        return _load_probe(model, state, strict)
    result = LoadResult()
    before = {k: tuple(v.shape) for k, v in state.items() if k in ("pos_embed", "pos_embedding")}
    if "pos_embedding" in before:
        before["pos_embed"] = before.pop("pos_embedding")
    before.update({k: tuple(v.shape) for k, v in state.items() if k == "decoder_pos_embed"})
    if isinstance(model, Crate):
        result.released_layout = any(k.startswith(crate.RELEASED_MARKERS) for k in state)
        state = crate.checkpoint_filter_fn(state, model)
        head_keys = [k for k in state if k.startswith(("head.", "head_norm."))]
        head = state.get("head.weight")
        if head is not None and (model.num_classes == 0 or head.shape[0] != model.num_classes):
            # a new task: the released recipe trains a new head, LN included
            dropped = head_keys if model.num_classes else [k for k in head_keys if k.startswith("head.")]
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
    missing = sorted(k for k in own if k not in state and not _is_new_head(k, result))
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
        raise CheckpointMismatchError(
            f"checkpoint does not fit {type(model).__name__}: {'; '.join(problems)}. "
            f"It looks like a {_describe(state)}; build the model that matches it "
            "(see crate_lit.models.MODEL_NAMES) or pass strict=False to skip missing/unexpected keys"
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
    if isinstance(model, Crate):
        return crate.to_released(state)
    if isinstance(model, CrateMAE):
        return crate_mae.to_released(state)
    raise TypeError(f"to_released_state_dict takes a crate-lit model, got {type(model).__name__}")
