"""CRATE-alpha: the CRATE that scales (Yang et al., "Scaling White-Box Transformers for Vision",
2024; UCSC-VLAA/CRATE-alpha).

CRATE with a different sparsification step: an overcomplete dictionary D (d x 4d) that two ISTA
steps from zero code against, a second, decoupled dictionary D1 that maps the code back to the
token space, and a residual around the step. Each of the three is a switch (``overcomplete``,
``decoupled``, ``residual``), so the paper's ablation from vanilla CRATE's step can be rerun.
The rest follows the released PyTorch code: a strided convolution as patch embedding, a learned
position table and class token (both standard normal), LayerNorm eps 1e-6 inside the layers, an
MSSA output projection without bias, and the head's LayerNorm + Linear on the class token.

Read top to bottom: the sparse-coding step, one layer, the model, released checkpoint mapping
(PyTorch and JAX layouts), named constructors.
"""

# no ``from __future__ import annotations``: see the note at the top of crate.py
from functools import partial
from typing import Any, Dict, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from .crate import (
    Crate,
    IstaBlock,
    LayerTrace,
    SubspaceAttention,
    build_named,
    pretrained_cfg,
    rename_keys,
    resample_pos_embed,
)
from .crate_mae import ConvPatchEmbed

__all__ = [
    "OvercompleteIstaBlock",
    "CrateAlphaBlock",
    "CrateAlpha",
    "checkpoint_filter_fn",
    "from_jax",
    "to_released",
    "CRATE_ALPHA_CONFIGS",
]


class OvercompleteIstaBlock(nn.Module):
    """Two non-negative ISTA steps from zero against an overcomplete dictionary D (d x r*d):

    ``A1 = relu(eta D^T y - eta lambda)``, ``A2 = relu(A1 - eta D^T (D A1 - y) - eta lambda)``,

    then the code A2 (r*d per token) mapped back by the decoupled dictionary D1 (``D1 A2``), or by
    D itself when not ``decoupled``. Both are stored as the released (d, r*d) parameters; with row
    vectors ``D^T y`` is ``y @ D``. ``D^T y`` is computed once and serves both steps."""

    def __init__(
        self, dim: int, ratio: int = 4, step_size: float = 0.1, lambd: float = 0.1, decoupled: bool = True
    ) -> None:
        super().__init__()
        self.step_size = step_size
        self.lambd = lambd
        self.dictionary = nn.Parameter(torch.empty(dim, ratio * dim))
        nn.init.kaiming_uniform_(self.dictionary)  # fan-in r*d, as released
        self.synthesis = None
        if decoupled:
            self.synthesis = nn.Parameter(torch.empty(dim, ratio * dim))
            nn.init.kaiming_uniform_(self.synthesis)

    def sparse_code(self, y: Tensor) -> Tensor:
        """A2, the sparse code of the tokens ``y`` (B, N, d) -> (B, N, r*d), non-negative."""
        d = self.dictionary.to(y.dtype)
        first = self.step_size * (y @ d) - self.step_size * self.lambd  # eta D^T y - eta lambda
        code = F.relu(first)
        return F.relu(code - self.step_size * ((code @ d.t()) @ d) + first)

    def decode(self, code: Tensor) -> Tensor:
        """The tokens a code stands for: ``D1 A2`` (or ``D A2``), (B, N, r*d) -> (B, N, d)."""
        synthesis = self.dictionary if self.synthesis is None else self.synthesis
        return code @ synthesis.to(code.dtype).t()

    def forward(self, y: Tensor) -> Tensor:
        return self.decode(self.sparse_code(y))


class CrateAlphaBlock(nn.Module):
    """Z^{l+1/2} = Z^l + MSSA(LN(Z^l)); Z^{l+1} = Z^{l+1/2} + D1 A2(LN(Z^{l+1/2})).

    ``overcomplete=False`` puts CRATE's one-step ISTA (d x d dictionary, from the input) in place
    of the two steps (``decoupled`` then has nothing to decouple), ``residual=False`` lets the
    step's output replace the stream as in CRATE. ``drop_path`` drops each residual branch per
    sample (the released JAX code's stochastic depth; 0 in its recipes)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        step_size: float = 0.1,
        lambd: float = 0.1,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        overcomplete_ratio: int = 4,
        overcomplete: bool = True,
        decoupled: bool = True,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if decoupled and not overcomplete:
            raise ValueError(
                "decoupled=True needs overcomplete=True (the one-step ISTA has a single dictionary); "
                "set decoupled=false too"
            )
        self.residual = residual
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mssa = SubspaceAttention(dim, num_heads, attn_drop, proj_drop, proj_bias=False)
        if num_heads == 1:  # the released attention has no output projection for one full-width head
            self.mssa.proj = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        if overcomplete:
            self.ista = OvercompleteIstaBlock(dim, overcomplete_ratio, step_size, lambd, decoupled)
        else:
            self.ista = IstaBlock(dim, step_size=step_size, lambd=lambd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _sparsify(self, z: Tensor, update: Tensor) -> Tensor:
        return z + self.drop_path(update) if self.residual else update

    def forward(self, z: Tensor) -> Tensor:
        z = z + self.drop_path(self.mssa(self.norm1(z)))
        return self._sparsify(z, self.ista(self.norm2(z)))

    @torch.jit.ignore
    def forward_trace(self, z: Tensor) -> Tuple[Tensor, LayerTrace]:
        """Same function as ``forward`` (in eval mode), keeping the attention maps and, as
        ``sparse``, the code the ISTA steps found (A2, r*d per token) rather than the stream."""
        w = self.mssa.project(self.norm1(z))
        attn = self.mssa.attention(w)
        compressed = z + self.mssa.merge(attn @ w)
        y = self.norm2(compressed)
        if isinstance(self.ista, OvercompleteIstaBlock):
            code = self.ista.sparse_code(y)
            update = self.ista.decode(code)
        else:
            code = update = self.ista(y)
        return self._sparsify(compressed, update), LayerTrace(w, attn, compressed, code)


class CrateAlpha(Crate):
    """CRATE-alpha classifier: :class:`~crate_lit.models.crate.Crate` with a convolutional patch
    embedding and :class:`CrateAlphaBlock` layers; everything else (class token, position table,
    pooled-token head, timm conventions, ``trace``) is CRATE's."""

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        global_pool: str = "cls",
        step_size: float = 0.1,
        lambd: float = 0.1,
        overcomplete_ratio: int = 4,
        overcomplete: bool = True,
        decoupled: bool = True,
        residual: bool = True,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        block = partial(
            CrateAlphaBlock,
            overcomplete_ratio=overcomplete_ratio,
            overcomplete=overcomplete,
            decoupled=decoupled,
            residual=residual,
        )
        super().__init__(
            img_size,
            patch_size,
            in_chans,
            num_classes,
            embed_dim,
            depth,
            num_heads,
            global_pool,
            step_size,
            lambd,
            attn_drop_rate=attn_drop_rate,
            proj_drop_rate=proj_drop_rate,
            drop_path_rate=drop_path_rate,
            embed_layer=ConvPatchEmbed,
            block_fn=block,
        )


# -- released checkpoint layouts ---------------------------------------------------------------
# PyTorch (torch_inference/model/crate_alpha.py): (released name, crate-lit name), "{i}" a layer
RELEASED_KEYS = [
    ("conv1.", "patch_embed.proj."),
    ("pos_embedding", "pos_embed"),
    ("transformer.layers.{i}.0.norm.", "blocks.{i}.norm1."),
    ("transformer.layers.{i}.0.fn.qkv.", "blocks.{i}.mssa.subspace."),
    ("transformer.layers.{i}.0.fn.to_out.0.", "blocks.{i}.mssa.proj."),
    ("transformer.layers.{i}.1.norm.", "blocks.{i}.norm2."),
    ("transformer.layers.{i}.1.fn.D1", "blocks.{i}.ista.synthesis"),
    ("transformer.layers.{i}.1.fn.D", "blocks.{i}.ista.dictionary"),
    ("mlp_head.0.", "head_norm."),
    ("mlp_head.1.", "head."),
]
RELEASED_MARKERS = ("conv1.", ".1.fn.D")

# JAX (models/crate.py, flax paths joined by "/" as big_vision writes its .npz files): (path,
# crate-lit name). The convolution kernel is (p, p, 3, d) there and flax Dense kernels are (in,
# out): from_jax turns them into PyTorch's layouts.
_LAYER = "Transformer/encoderblock_{i}/"
_ATTENTION = _LAYER + "MultiHeadDotProductSubspaceAttention_0/"
JAX_KEYS = [
    ("embedding/kernel", "patch_embed.proj.weight"),
    ("embedding/bias", "patch_embed.proj.bias"),
    ("cls", "cls_token"),
    ("pos_embedding", "pos_embed"),
    (_LAYER + "LayerNorm_0/scale", "blocks.{i}.norm1.weight"),
    (_LAYER + "LayerNorm_0/bias", "blocks.{i}.norm1.bias"),
    (_ATTENTION + "proj/kernel", "blocks.{i}.mssa.subspace.weight"),
    (_ATTENTION + "out/kernel", "blocks.{i}.mssa.proj.weight"),
    (_LAYER + "LayerNorm_1/scale", "blocks.{i}.norm2.weight"),
    (_LAYER + "LayerNorm_1/bias", "blocks.{i}.norm2.bias"),
    (_LAYER + "OvercompleteISTABlock_0/D", "blocks.{i}.ista.dictionary"),
    (_LAYER + "OvercompleteISTABlock_0/D1", "blocks.{i}.ista.synthesis"),
    ("encoder_norm/scale", "head_norm.weight"),
    ("encoder_norm/bias", "head_norm.bias"),
    ("head/kernel", "head.weight"),
    ("head/bias", "head.bias"),
]
_JAX_DENSE = ("mssa.subspace.weight", "mssa.proj.weight", "head.weight")
# the subtrees a big_vision file may keep the parameters under: an optax train state, a flax
# optimizer, the image tower of a two-tower (CLIPA) model
_JAX_PREFIXES = ("params/", "opt/target/", "img/")


def is_jax_layout(state_dict: Dict[str, Tensor]) -> bool:
    return any("/" in key for key in state_dict)


def from_jax(arrays: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A big_vision .npz of CRATE-alpha (arrays by flax path) as crate-lit tensors. Paths that
    are no CRATE-alpha parameter pass through unchanged, so that a strict load names them."""
    for prefix in _JAX_PREFIXES:
        inside = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        if inside:
            arrays = inside
    out = rename_keys(arrays, JAX_KEYS)
    for key, value in out.items():
        if key == "patch_embed.proj.weight" and value.dim() == 4:
            out[key] = value.permute(3, 2, 0, 1).contiguous()
        elif key.endswith(_JAX_DENSE) and value.dim() == 2:
            out[key] = value.t().contiguous()
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: CrateAlpha) -> Dict[str, Tensor]:
    """Map a released CRATE-alpha state dict (PyTorch names, or the JAX .npz arrays) onto
    ``model``; crate-lit's own keys pass through. The position table is resampled to the
    model's grid; a patch embedding of another patch size is left out, so that the model keeps
    its own (re-initialised, as the released fine-tuning recipe does: ``dont_load``)."""
    out = from_jax(state_dict) if is_jax_layout(state_dict) else rename_keys(state_dict, RELEASED_KEYS)
    if "pos_embed" in out and out["pos_embed"].shape != model.pos_embed.shape:
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], model.patch_embed.grid_size)
    kernel = out.get("patch_embed.proj.weight")
    if kernel is not None and kernel.shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
        del out["patch_embed.proj.weight"]
    return out


def to_released(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """crate-lit keys -> the released CRATE-alpha PyTorch key names."""
    return rename_keys(state_dict, RELEASED_KEYS, to_released=True)


# -- named configurations -------------------------------------------------------------------------
# The released sizes (the JAX code's variants Ti/S/B/L/H), at the patch sizes of the paper's
# models (B/16, B/8, L/14, L/8, H/14; /32 for its ablations), and CPU-sized ones for demos and tests.
CRATE_ALPHA_CONFIGS: Dict[str, Dict[str, Any]] = {
    "crate_alpha_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "crate_alpha_small": dict(embed_dim=576, depth=12, num_heads=12),
    "crate_alpha_base": dict(embed_dim=768, depth=12, num_heads=12),
    "crate_alpha_large": dict(embed_dim=1024, depth=24, num_heads=16, patch_size=14),
    "crate_alpha_huge": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
    "crate_alpha_base_patch8": dict(embed_dim=768, depth=12, num_heads=12, patch_size=8),
    "crate_alpha_large_patch8": dict(embed_dim=1024, depth=24, num_heads=16, patch_size=8),
    "crate_alpha_small_patch32": dict(embed_dim=576, depth=12, num_heads=12, patch_size=32),
    "crate_alpha_base_patch32": dict(embed_dim=768, depth=12, num_heads=12, patch_size=32),
    "crate_alpha_large_patch32": dict(embed_dim=1024, depth=24, num_heads=16, patch_size=32),
    # CPU-sized, as crate_mini / crate_micro
    "crate_alpha_mini": dict(embed_dim=192, depth=4, num_heads=6, img_size=32, patch_size=8, num_classes=10),
    "crate_alpha_micro": dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, num_classes=10),
}


# bilinear: the released recipes' crops and resizes
default_cfgs = generate_default_cfgs(
    {name: pretrained_cfg(args, interpolation="bilinear") for name, args in CRATE_ALPHA_CONFIGS.items()}
)


def _create_crate_alpha(variant: str, pretrained: bool = False, **kwargs: Any) -> CrateAlpha:
    return build_named(CrateAlpha, CRATE_ALPHA_CONFIGS, checkpoint_filter_fn, variant, pretrained, **kwargs)


@register_model
def crate_alpha_tiny(pretrained: bool = False, **kwargs: Any) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_tiny", pretrained, **kwargs)


@register_model
def crate_alpha_small(pretrained: bool = False, **kwargs: Any) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_small", pretrained, **kwargs)


@register_model
def crate_alpha_base(pretrained: bool = False, **kwargs: Any) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_base", pretrained, **kwargs)


@register_model
def crate_alpha_large(pretrained: bool = False, **kwargs: Any) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_large", pretrained, **kwargs)


@register_model
def crate_alpha_huge(pretrained: bool = False, **kwargs: Any) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_huge", pretrained, **kwargs)


@register_model
def crate_alpha_base_patch8(pretrained: bool = False, **kwargs: Any) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_base_patch8", pretrained, **kwargs)


@register_model
def crate_alpha_large_patch8(pretrained: bool = False, **kwargs: Any) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_large_patch8", pretrained, **kwargs)


@register_model
def crate_alpha_small_patch32(pretrained: bool = False, **kwargs: Any) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_small_patch32", pretrained, **kwargs)


@register_model
def crate_alpha_base_patch32(pretrained: bool = False, **kwargs: Any) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_base_patch32", pretrained, **kwargs)


@register_model
def crate_alpha_large_patch32(pretrained: bool = False, **kwargs: Any) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_large_patch32", pretrained, **kwargs)


@register_model
def crate_alpha_mini(pretrained: bool = False, **kwargs: Any) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_mini", pretrained, **kwargs)


@register_model
def crate_alpha_micro(pretrained: bool = False, **kwargs: Any) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_micro", pretrained, **kwargs)
