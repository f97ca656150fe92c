"""CRATE, the white-box transformer for image classification.

Each layer is one step on the sparse rate reduction objective: a compression step
(multi-head subspace self-attention, MSSA) with a residual, then a sparsification step
(one step of non-negative ISTA against a learned dictionary) with no residual.
Facts (formulas, init, checkpoint layout): Yu et al., "White-Box Transformers via
Sparse Rate Reduction" (NeurIPS 2023) and the released code's checkpoints.

Read top to bottom: the tokenizer, the two steps, one layer, the model, released
checkpoint mapping, named constructors.
"""

# No ``from __future__ import annotations`` here or in crate_mae.py: torch.fx writes string
# annotations into the code it generates (``x : _Tensor_``), which TorchScript then cannot resolve,
# and timm's tests script every registered model after tracing it.
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, resample_abs_pos_embed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

__all__ = [
    "PatchTokenizer",
    "SubspaceAttention",
    "IstaBlock",
    "CrateBlock",
    "Crate",
    "LayerTrace",
    "WhiteboxTrace",
    "checkpoint_filter_fn",
    "to_released",
    "resample_pos_embed",
    "rename_keys",
    "CRATE_CONFIGS",
]


def patch_grid(img_size: Tuple[int, int], patch_size: int) -> Tuple[int, int]:
    """The (rows, columns) of non-overlapping patches; an image size that leaves a remainder is
    refused rather than cropped."""
    if img_size[0] % patch_size or img_size[1] % patch_size:
        raise ValueError(
            f"image size {img_size} is not divisible by patch size {patch_size}; "
            "choose an image size that is a multiple of the patch size"
        )
    return img_size[0] // patch_size, img_size[1] // patch_size


class PatchTokenizer(nn.Module):
    """f^pre: non-overlapping patches flattened as (row, column, channel), LN, Linear, LN."""

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = patch_grid(self.img_size, patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        patch_dim = patch_size * patch_size * in_chans
        self.patch_norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        # one assert per side: torch.fx traces each comparison, not their ``and``
        message = "input image size does not match the model's img_size; resize the input or build "
        message += "the model with that img_size (load_pretrained resamples the position table)"
        torch._assert(x.shape[-2] == self.img_size[0], message)
        torch._assert(x.shape[-1] == self.img_size[1], message)
        p = self.patch_size
        gh, gw = self.grid_size
        # channel fastest inside a patch, as the released einops pattern (p1 p2 c)
        x = x.reshape(-1, self.in_chans, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
        x = x.reshape(-1, gh * gw, p * p * self.in_chans)
        return self.norm(self.proj(self.patch_norm(x)))


class SubspaceAttention(nn.Module):
    """MSSA: one bias-free projection U serves as query, key and value of every head; the heads'
    outputs are merged by a Linear layer (with a bias in CRATE, without in CRATE-alpha)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        proj_bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.subspace = nn.Linear(dim, dim, bias=False)  # U = [U_1 ... U_K]
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def project(self, x: Tensor) -> Tensor:
        """U x split per head: (B, N, d) -> (B, heads, N, head_dim)."""
        B, N, _ = x.shape
        return self.subspace(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def merge(self, heads: Tensor) -> Tensor:
        B, _, N, _ = heads.shape
        return self.proj_drop(self.proj(heads.transpose(1, 2).reshape(B, N, -1)))

    def attention(self, w: Tensor) -> Tensor:
        """softmax(w w^T / sqrt(p)) per head: (B, heads, N, N)."""
        return torch.softmax((w * self.scale) @ w.transpose(-2, -1), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        w = self.project(x)
        dropout = self.attn_drop if self.training else 0.0
        return self.merge(F.scaled_dot_product_attention(w, w, w, dropout_p=dropout))


class IstaBlock(nn.Module):
    """One non-negative ISTA step: relu(x + eta * D^T (x - D x) - eta * lambda).

    Row-vector convention of the released weight: ``D x`` is ``x @ D.T``. The step is linear
    in x before the threshold, so it is computed as ``relu(x @ M - eta * lambda)`` with
    ``M = I + eta (D - D^T D)``: one token-sized product instead of the released three (and
    one d x d x d product per call, cheaper as soon as there are more tokens than d).
    """

    def __init__(self, dim: int, step_size: float = 0.1, lambd: float = 0.1) -> None:
        super().__init__()
        self.step_size = step_size
        self.lambd = lambd
        self.dictionary = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.dictionary)  # bound sqrt(6 / d), as released

    def step_matrix(self) -> Tensor:
        """M = I + eta (D - D^T D)."""
        d = self.dictionary
        m = torch.addmm(d, d.t(), d, alpha=-1.0) * self.step_size
        return m + torch.eye(d.shape[0], dtype=m.dtype, device=m.device)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(torch.matmul(x, self.step_matrix().to(x.dtype)) - self.step_size * self.lambd)


@dataclass
class LayerTrace:
    """What one CRATE layer computed, for white-box analysis.

    ``subspace``: U LN(Z^l), (B, heads, N, p); ``attention``: per-head softmax maps,
    (B, heads, N, N); ``compressed``: Z^{l+1/2}; ``sparse``: Z^{l+1} (both (B, N, d)).
    """

    subspace: Tensor
    attention: Tensor
    compressed: Tensor
    sparse: Tensor


@dataclass
class WhiteboxTrace:
    """Per-layer traces of a forward pass plus the model's output."""

    layers: List[LayerTrace] = field(default_factory=list)
    output: Optional[Tensor] = None
    extras: Dict[str, Any] = field(default_factory=dict)

    def stack(self, name: str) -> Tensor:
        """One tensor over depth, e.g. ``trace.stack('sparse')`` -> (L, B, N, d)."""
        return torch.stack([getattr(layer, name) for layer in self.layers])


class CrateBlock(nn.Module):
    """Z^{l+1/2} = Z^l + MSSA(LN(Z^l)); Z^{l+1} = ISTA(LN(Z^{l+1/2})), no residual.

    ``drop_path`` (stochastic depth, for fine-tuning; 0 in the released models) drops the MSSA
    branch per sample: the ISTA step replaces the stream, so it has no branch to drop."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        step_size: float = 0.1,
        lambd: float = 0.1,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mssa = SubspaceAttention(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.ista = IstaBlock(dim, step_size=step_size, lambd=lambd)

    def forward(self, z: Tensor) -> Tensor:
        z = z + self.drop_path(self.mssa(self.norm1(z)))
        return self.ista(self.norm2(z))

    @torch.jit.ignore
    def forward_trace(self, z: Tensor) -> Tuple[Tensor, LayerTrace]:
        """Same function as ``forward`` (in eval mode), with the explicit attention maps kept."""
        w = self.mssa.project(self.norm1(z))
        attn = self.mssa.attention(w)
        compressed = z + self.mssa.merge(attn @ w)
        sparse = self.ista(self.norm2(compressed))
        return sparse, LayerTrace(w, attn, compressed, sparse)


def drop_path_rates(rate: float, depth: int) -> List[float]:
    """Stochastic depth per layer: linear from 0 at the first to ``rate`` at the last."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def take_indices(num_blocks: int, indices: Union[int, List[int], None]) -> Tuple[List[int], int]:
    """The blocks timm's ``forward_intermediates`` convention names, and the last of them: an int
    ``n`` is the last ``n`` blocks, a list names blocks by index (negative from the end). (timm's
    own helper for this is not part of its public API.)"""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices={indices}: take between 1 and {num_blocks} of the {num_blocks} blocks")
        taken = list(range(num_blocks - indices, num_blocks))
    else:
        taken = [num_blocks + i if i < 0 else i for i in indices]
        if not all(0 <= i < num_blocks for i in taken):
            raise ValueError(
                f"indices={indices}: a model with {num_blocks} blocks has indices 0 to {num_blocks - 1}"
            )
    return taken, max(taken)


def resample_pos_embed(pos_embed: Tensor, grid_size: Tuple[int, int], num_prefix_tokens: int = 1) -> Tensor:
    """Bicubic resize of the patch part of a (1, prefix + H*W, d) table; prefix rows kept. timm's
    resampling without its antialiasing, which has always been how this project resized (and only
    differs when the grid shrinks)."""
    patches = pos_embed.shape[1] - num_prefix_tokens
    old = int(math.isqrt(patches))
    if old * old != patches:
        raise ValueError(f"cannot resample a non-square position grid of {patches} patches")
    return resample_abs_pos_embed(
        pos_embed, list(grid_size), (old, old), num_prefix_tokens, antialias=False, align_corners=False
    )


class Crate(nn.Module):
    """CRATE classifier: tokenizer, ``depth`` CRATE layers, pooled token, LN, Linear.

    ``embed_layer`` and ``block_fn`` build the tokenizer and the layers (CRATE-alpha passes its
    own, as timm's ViT variants do); ``drop_path_rate`` is stochastic depth, rising linearly
    from 0 at the first layer to it at the last (timm's rule)."""

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        global_pool: str = "cls",
        step_size: float = 0.1,
        lambd: float = 0.1,
        pos_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        embed_layer: Callable[..., nn.Module] = PatchTokenizer,
        block_fn: Callable[..., nn.Module] = CrateBlock,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = _pool_name(global_pool)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.patch_embed = embed_layer(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.blocks = nn.Sequential(
            *[
                block_fn(
                    embed_dim,
                    num_heads,
                    step_size=step_size,
                    lambd=lambd,
                    attn_drop=attn_drop_rate,
                    proj_drop=proj_drop_rate,
                    drop_path=rate,
                )
                for rate in drop_path_rates(drop_path_rate, depth)
            ]
        )
        self.head_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)
        ]

    # -- timm conventions -------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None)])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _pool_name(global_pool)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # -- forward ------------------------------------------------------------------------
    def _embed(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:
        """Token stream after the last layer, (B, 1 + N, d); non-negative (ISTA output)."""
        return self.blocks(self._embed(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=1) if self.global_pool == "mean" else x[:, 0]
        x = self.head_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """timm's intermediate-feature API; ``norm`` is accepted and ignored (no final norm)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = take_indices(len(self.blocks), indices)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        x = self._embed(x)
        kept = []
        for i, block in enumerate(blocks):
            x = block(x)
            if i in take:
                kept.append(x)
        prefix = [y[:, : self.num_prefix_tokens] for y in kept]
        kept = [y[:, self.num_prefix_tokens :] for y in kept]
        if output_fmt == "NCHW":
            gh, gw = self.patch_embed.grid_size
            kept = [y.reshape(y.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in kept]
        if return_prefix_tokens:
            kept = list(zip(kept, prefix, strict=True))
        return kept if intermediates_only else (x, kept)

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        take, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_head:
            self.head_norm = nn.Identity()
            self.reset_classifier(0)
        return take

    @torch.jit.ignore
    def trace(self, x: Tensor) -> WhiteboxTrace:
        """Forward pass that keeps, per layer, U LN(Z^l), the attention maps, Z^{l+1/2}
        and Z^{l+1} (see :class:`LayerTrace`); ``output`` holds the logits."""
        z = self._embed(x)
        result = WhiteboxTrace(extras={"grid_size": self.patch_embed.grid_size})
        for block in self.blocks:
            z, layer = block.forward_trace(z)
            result.layers.append(layer)
        result.output = self.forward_head(z)
        return result


def _pool_name(pool: str) -> str:
    names = {"cls": "cls", "token": "cls", "mean": "mean", "avg": "mean"}
    if pool not in names:
        raise ValueError(f"global_pool must be 'cls' or 'mean' (timm: 'token', 'avg'), got {pool!r}")
    return names[pool]


# -- released checkpoint layout ------------------------------------------------------------
# (released name, crate-lit name); "{i}" stands for a layer index, a trailing "." for a prefix
RELEASED_KEYS = [
    ("pos_embedding", "pos_embed"),
    ("to_patch_embedding.1.", "patch_embed.patch_norm."),
    ("to_patch_embedding.2.", "patch_embed.proj."),
    ("to_patch_embedding.3.", "patch_embed.norm."),
    ("transformer.layers.{i}.0.norm.", "blocks.{i}.norm1."),
    ("transformer.layers.{i}.0.fn.qkv.", "blocks.{i}.mssa.subspace."),
    ("transformer.layers.{i}.0.fn.to_out.0.", "blocks.{i}.mssa.proj."),
    ("transformer.layers.{i}.1.norm.", "blocks.{i}.norm2."),
    ("transformer.layers.{i}.1.fn.weight", "blocks.{i}.ista.dictionary"),
    ("mlp_head.0.", "head_norm."),
    ("mlp_head.1.", "head."),
]
RELEASED_MARKERS = ("to_patch_embedding.", "transformer.layers.", "mlp_head.", "pos_embedding")


def rename_keys(
    state_dict: Dict[str, Tensor], pairs: List[Tuple[str, str]], to_released: bool = False
) -> Dict[str, Tensor]:
    """Rename keys by a (released, crate-lit) table, in either direction; others pass."""
    rules = []
    for released, ours in pairs:
        src, dst = (ours, released) if to_released else (released, ours)
        pattern = r"(\d+)".join(re.escape(part) for part in src.split("{i}"))
        rules.append((re.compile("^" + pattern + ("" if src.endswith(".") else "$")), dst))

    def rename(key: str) -> str:
        for pattern, dst in rules:
            match = pattern.match(key)
            if match:
                index = match.group(1) if match.groups() else ""
                return dst.replace("{i}", index) + key[match.end() :]
        return key

    return {rename(k): v for k, v in state_dict.items()}


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: Crate) -> Dict[str, Tensor]:
    """Map a released CRATE state dict (already unwrapped, no ``module.``) onto ``model``;
    crate-lit's own keys pass through. The position table is resampled to the model's grid."""
    out = rename_keys(state_dict, RELEASED_KEYS)
    if "pos_embed" in out and out["pos_embed"].shape != model.pos_embed.shape:
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], model.patch_embed.grid_size)
    return out


def to_released(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """crate-lit keys -> the released CRATE key names (loads into the original code)."""
    return rename_keys(state_dict, RELEASED_KEYS, to_released=True)


# -- named configurations ---------------------------------------------------------------
# The four published sizes (patch 16 and patch 8) and small CPU variants for demos and tests.
CRATE_CONFIGS: Dict[str, Dict[str, Any]] = {
    "crate_tiny": dict(embed_dim=384, depth=12, num_heads=6),
    "crate_small": dict(embed_dim=576, depth=12, num_heads=12),
    "crate_base": dict(embed_dim=768, depth=12, num_heads=12),
    "crate_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "crate_tiny_patch8": dict(embed_dim=384, depth=12, num_heads=6, patch_size=8),
    "crate_small_patch8": dict(embed_dim=576, depth=12, num_heads=12, patch_size=8),
    # the CPAL emergent-segmentation demo model: CRATE-B/8 with 6 heads
    "crate_base_patch8": dict(embed_dim=768, depth=12, num_heads=6, patch_size=8),
    "crate_large_patch8": dict(embed_dim=1024, depth=24, num_heads=16, patch_size=8),
    # CPU-sized, for the demo (mini) and the tests (micro); 32 px here, the Hydra configs take
    # the data config's image size (48 px on data=shapes)
    "crate_mini": dict(embed_dim=192, depth=4, num_heads=6, img_size=32, patch_size=8, num_classes=10),
    "crate_micro": dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, num_classes=10),
}


# -- named constructors (registered in timm's model registry) ----------------------------
def pretrained_cfg(args: Dict[str, Any], interpolation: str = "bicubic") -> Dict[str, Any]:
    """timm's pretrained config of a named model built with ``args`` (its size-table entry):
    input size, crop and normalisation (0.5 for the CPU-sized models, trained on the shapes
    dataset; ImageNet's otherwise)."""
    size = to_2tuple(args.get("img_size", 224))
    cpu_sized = size[0] < 224
    return {
        "url": "",
        "num_classes": args.get("num_classes", 1000),
        "input_size": (3, *size),
        "pool_size": None,
        "crop_pct": 1.0 if cpu_sized else 0.875,
        "interpolation": interpolation,
        "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5) if cpu_sized else IMAGENET_DEFAULT_MEAN,
        "std": (0.5, 0.5, 0.5) if cpu_sized else IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
    }


def build_named(
    cls: type,
    table: Dict[str, Dict[str, Any]],
    filter_fn: Callable,
    variant: str,
    pretrained: bool,
    **kwargs: Any,
) -> nn.Module:
    """A named model through timm's ``build_model_with_cfg``: its size-table entry under
    ``kwargs``, released weights mapped by ``filter_fn``, features by block (``features_only``)."""
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        cls,
        variant,
        pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **{**table[variant], **kwargs},
    )


default_cfgs = generate_default_cfgs({name: pretrained_cfg(args) for name, args in CRATE_CONFIGS.items()})


def _create_crate(variant: str, pretrained: bool = False, **kwargs: Any) -> Crate:
    return build_named(Crate, CRATE_CONFIGS, checkpoint_filter_fn, variant, pretrained, **kwargs)


@register_model
def crate_tiny(pretrained: bool = False, **kwargs: Any) -> Crate:
    return _create_crate("crate_tiny", pretrained, **kwargs)


@register_model
def crate_small(pretrained: bool = False, **kwargs: Any) -> Crate:
    return _create_crate("crate_small", pretrained, **kwargs)


@register_model
def crate_base(pretrained: bool = False, **kwargs: Any) -> Crate:
    return _create_crate("crate_base", pretrained, **kwargs)


@register_model
def crate_large(pretrained: bool = False, **kwargs: Any) -> Crate:
    return _create_crate("crate_large", pretrained, **kwargs)


@register_model
def crate_tiny_patch8(pretrained: bool = False, **kwargs: Any) -> Crate:
    return _create_crate("crate_tiny_patch8", pretrained, **kwargs)


@register_model
def crate_small_patch8(pretrained: bool = False, **kwargs: Any) -> Crate:
    return _create_crate("crate_small_patch8", pretrained, **kwargs)


@register_model
def crate_base_patch8(pretrained: bool = False, **kwargs: Any) -> Crate:
    return _create_crate("crate_base_patch8", pretrained, **kwargs)


@register_model
def crate_large_patch8(pretrained: bool = False, **kwargs: Any) -> Crate:
    return _create_crate("crate_large_patch8", pretrained, **kwargs)


@register_model
def crate_mini(pretrained: bool = False, **kwargs: Any) -> Crate:
    return _create_crate("crate_mini", pretrained, **kwargs)


@register_model
def crate_micro(pretrained: bool = False, **kwargs: Any) -> Crate:
    return _create_crate("crate_micro", pretrained, **kwargs)
