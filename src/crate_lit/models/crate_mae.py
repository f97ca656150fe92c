"""CRATE-MAE: masked autoencoding with a CRATE encoder and its transposed decoder.

Reproduces the released model (Pai et al., "Masked Completion via Structured Diffusion
with White-Box Transformers", ICLR 2024), including its quirks, which differ from the
usual MAE: the encoder sees the whole sequence with mask tokens in place, the fixed
*decoder* sine-cosine table is the one added, the encoder's ISTA uses lambda 0.5, and
each decoder layer is the transpose of an encoder layer (a linear dictionary map, then
MSSA subtracted). Loss on masked patches only.
"""

# no ``from __future__ import annotations``: see the note at the top of crate.py
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch import Tensor, nn

from .crate import (
    CrateBlock,
    SubspaceAttention,
    WhiteboxTrace,
    drop_path_rates,
    patch_grid,
    rename_keys,
)

__all__ = [
    "ConvPatchEmbed",
    "CrateDecoderBlock",
    "CrateMAE",
    "sincos_pos_embed_2d",
    "checkpoint_filter_fn",
    "to_released",
    "CRATE_MAE_CONFIGS",
]


def sincos_pos_embed_2d(embed_dim: int, grid_size: Tuple[int, int], cls_token: bool = True) -> Tensor:
    """Fixed 2-D sine-cosine table (MAE's): first half encodes the column, second the row,
    each half [sin, cos] over frequencies 1 / 10000^(2i/(d/2)); a zero row for the class token."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for a 2-D sine-cosine table")
    gh, gw = grid_size
    omega = torch.arange(embed_dim // 4, dtype=torch.float32) / (embed_dim / 4.0)
    omega = 1.0 / 10000**omega
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij"
    )

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim), table], dim=0)
    return table.unsqueeze(0)


class ConvPatchEmbed(nn.Module):
    """Patches through a strided convolution (kernel = stride = patch)."""

    def __init__(self, img_size: Union[int, Tuple[int, int]], patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.grid_size = patch_grid(self.img_size, patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        message = "input image size does not match the model's img_size"
        torch._assert(x.shape[-2] == self.img_size[0], message)
        torch._assert(x.shape[-1] == self.img_size[1], message)
        return self.proj(x).flatten(2).transpose(1, 2)


class CrateDecoderBlock(nn.Module):
    """Transpose of a CRATE layer: y = D' LN(x) (linear, no relu), x = y - MSSA'(LN(y))."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.dictionary = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.dictionary)
        self.norm2 = nn.LayerNorm(dim)
        self.mssa = SubspaceAttention(dim, num_heads)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(self.norm1(x), self.dictionary)
        return y - self.mssa(self.norm2(y))


class CrateMAE(nn.Module):
    """CRATE-MAE. ``forward(imgs, mask_ratio)`` returns ``(loss, pred, mask)`` like the
    released code; ``mask`` is 1 on removed patches. ``mask_ratio=0`` is a plain
    autoencoder (loss then averages over all patches instead of dividing by zero)."""

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        decoder_depth: Optional[int] = None,
        step_size: float = 0.1,
        lambd: float = 0.5,
        norm_pix_loss: bool = False,
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        encode_visible_only: bool = False,
    ) -> None:
        super().__init__()
        del num_classes  # accepted so configs can share keys with classifiers; MAE has no head
        self.in_chans = in_chans
        self.embed_dim = self.num_features = embed_dim
        self.norm_pix_loss = norm_pix_loss
        self.encode_visible_only = encode_visible_only
        self.patch_embed = ConvPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = self.patch_embed.grid_size
        num_tokens = self.patch_embed.num_patches + 1

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # both fixed tables are parameters without grad in the released model; the
        # encoder's own table is never added in its forward pass
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, grid), requires_grad=False)
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, grid), requires_grad=False)
        assert self.pos_embed.shape[1] == num_tokens
        # stochastic depth in the encoder only, for fine-tuning it (0 in pre-training, as released)
        self.blocks = nn.ModuleList(
            [
                CrateBlock(embed_dim, num_heads, step_size, lambd, drop_path=rate)
                for rate in drop_path_rates(drop_path_rate, depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # unused in the released forward pass; kept so released files round-trip
        self.decoder_embed = nn.Linear(embed_dim, embed_dim)
        self.decoder_blocks = nn.ModuleList(
            [CrateDecoderBlock(embed_dim, num_heads) for _ in range(decoder_depth or depth)]
        )
        self.decoder_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(embed_dim, patch_size * patch_size * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"cls_token", "mask_token", "pos_embed", "decoder_pos_embed"}

    # -- patches ------------------------------------------------------------------------
    def patchify(self, imgs: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), patch row, patch column, channel."""
        p = self.patch_embed.patch_size
        gh, gw = imgs.shape[2] // p, imgs.shape[3] // p
        x = imgs.reshape(imgs.shape[0], self.in_chans, gh, p, gw, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(imgs.shape[0], gh * gw, -1)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, L, p*p*C) -> (B, C, H, W), the inverse of :meth:`patchify`."""
        p = self.patch_embed.patch_size
        gh, gw = self.patch_embed.grid_size
        x = x.reshape(x.shape[0], gh, gw, p, p, self.in_chans).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], self.in_chans, gh * p, gw * p)

    # -- masking, encoder, decoder, loss ---------------------------------------------------
    def random_masking(
        self, batch: int, mask_ratio: float, noise: Optional[Tensor] = None, device: Any = None
    ) -> Tensor:
        """Per-sample mask (1 = removed): the ``int(L * (1 - ratio))`` lowest-noise patches stay."""
        num_patches = self.patch_embed.num_patches
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if noise is None:
            noise = torch.rand(batch, num_patches, device=device)
        len_keep = int(num_patches * (1 - mask_ratio))
        rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)
        return (rank >= len_keep).to(noise.dtype)

    def _encoder_input(self, imgs: Tensor, mask: Tensor) -> Tensor:
        x = self.patch_embed(imgs)
        # mask tokens at the removed positions: the same sequence the released code builds
        # by gathering, shuffling back and concatenating
        x = torch.where(mask.unsqueeze(-1).bool(), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.decoder_pos_embed

    def forward_encoder(
        self, imgs: Tensor, mask_ratio: float = 0.75, noise: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """Returns the encoded sequence (B, 1 + L, d) after the final LN, and the mask."""
        if self.encode_visible_only and mask_ratio > 0:
            return self._encode_visible(imgs, mask_ratio, noise)
        mask = self.random_masking(imgs.shape[0], mask_ratio, noise, imgs.device)
        x = self._encoder_input(imgs, mask)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask

    def _encode_visible(
        self, imgs: Tensor, mask_ratio: float, noise: Optional[Tensor]
    ) -> Tuple[Tensor, Tensor]:
        """``encode_visible_only``, as FAIR's MAE encodes: the encoder sees the class token and the
        visible patches only (1 + L (1 - ratio) tokens, a quarter of the work at 0.75), each with
        its row of the sine-cosine table; the removed positions of the sequence the decoder gets
        hold the mask token with its row, through the final LN. NOT the released CRATE-MAE,
        whose encoder sees every position (mask tokens included): another function of the
        weights, so a model trained one way is not the other."""
        b = imgs.shape[0]
        if noise is None:
            noise = torch.rand(b, self.patch_embed.num_patches, device=imgs.device)
        mask = self.random_masking(b, mask_ratio, noise)
        keep = torch.argsort(noise, dim=1)[:, : int(self.patch_embed.num_patches * (1 - mask_ratio))]
        table = self.decoder_pos_embed.to(imgs.dtype)
        patches = self.patch_embed(imgs) + table[:, 1:]
        index = keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        x = torch.cat([(self.cls_token + table[:, :1]).expand(b, -1, -1), patches.gather(1, index)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        filler = self.norm(self.mask_token + table[:, 1:]).expand(b, -1, -1)
        return torch.cat([x[:, :1], filler.scatter(1, index, x[:, 1:])], dim=1), mask

    def forward_decoder(self, latent: Tensor) -> Tensor:
        x = latent
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = (pred - target).pow(2).mean(dim=-1)
        masked = mask.sum()
        # a select rather than a Python branch on ``masked``: reading a tensor's value would
        # split a torch.compile graph in two (and wait for the GPU)
        return torch.where(masked > 0, (per_patch * mask).sum() / masked.clamp(min=1), per_patch.mean())

    def forward(
        self, imgs: Tensor, mask_ratio: float = 0.75, noise: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        latent, mask = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def reconstruction_images(
        self, imgs: Tensor, pred: Tensor, mask: Tensor, paste_visible: bool = False
    ) -> Tuple[Tensor, Tensor]:
        """For showing a forward pass: the masked input (removed patches zeroed) and the
        reconstruction as images (B, C, H, W), with ``paste_visible`` the visible patches taken
        from the input; with ``norm_pix_loss`` the per-patch normalisation of the prediction is
        undone with the target's statistics."""
        if self.norm_pix_loss:
            target = self.patchify(imgs)
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        pixel_mask = self.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]).to(imgs.dtype))
        reconstruction = self.unpatchify(pred)
        if paste_visible:
            reconstruction = imgs * (1 - pixel_mask) + reconstruction * pixel_mask
        return imgs * (1 - pixel_mask), reconstruction

    def forward_features(self, imgs: Tensor) -> Tensor:
        """Encoder output for the whole, unmasked image: (B, 1 + L, d)."""
        return self.forward_encoder(imgs, mask_ratio=0.0)[0]

    @torch.jit.ignore
    def trace(self, imgs: Tensor, mask_ratio: float = 0.0, noise: Optional[Tensor] = None) -> WhiteboxTrace:
        """Per-layer traces of the encoder (see ``LayerTrace``); ``output`` holds the
        reconstruction (B, L, p*p*C), ``extras['mask']`` the mask."""
        mask = self.random_masking(imgs.shape[0], mask_ratio, noise, imgs.device)
        z = self._encoder_input(imgs, mask)
        result = WhiteboxTrace(extras={"grid_size": self.patch_embed.grid_size, "mask": mask})
        for block in self.blocks:
            z, layer = block.forward_trace(z)
            result.layers.append(layer)
        result.output = self.forward_decoder(self.norm(z))
        return result


class CrateMAEClassifier(nn.Module):
    """A classifier on a CRATE-MAE encoder: the class token of the unmasked encoder output (after
    its final LayerNorm) into a head. With ``probe`` the head is the MAE recipe's linear probe,
    BatchNorm without affine parameters then a Linear layer; without, the head of MAE's
    fine-tuning (with its ``--cls_token`` option), one Linear layer initialised at std 2e-5. The
    decoder stays in ``encoder`` so that MAE checkpoints load unchanged, frozen because nothing
    flows through it (DDP would report it unused)."""

    def __init__(self, encoder: CrateMAE, num_classes: int, probe: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.probe = probe
        self.num_features = self.embed_dim = encoder.embed_dim
        for part in (
            encoder.decoder_embed,
            encoder.decoder_blocks,
            encoder.decoder_norm,
            encoder.decoder_pred,
        ):
            part.requires_grad_(False)
        encoder.mask_token.requires_grad_(False)
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        linear = nn.Linear(self.embed_dim, num_classes)
        # the MAE recipe's initialisations: linear probe, fine-tuning
        nn.init.trunc_normal_(linear.weight, std=0.01 if self.probe else 2e-5)
        nn.init.zeros_(linear.bias)
        if self.probe:
            self.head = nn.Sequential(nn.BatchNorm1d(self.embed_dim, affine=False, eps=1e-6), linear)
        else:
            self.head = linear

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's layer groups (layer-wise learning-rate decay): the embedding, each encoder
        layer, then the final norm and the head."""
        return dict(
            stem=r"^encoder\.(?:cls_token|mask_token|pos_embed|patch_embed)",
            blocks=[(r"^encoder\.blocks\.(\d+)", None)],
        )

    def forward_features(self, imgs: Tensor) -> Tensor:
        return self.encoder.forward_features(imgs)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, imgs: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(imgs))

    @torch.jit.ignore
    def trace(self, imgs: Tensor) -> WhiteboxTrace:
        return self.encoder.trace(imgs)


# -- released checkpoint layout ------------------------------------------------------------
# (released name, crate-lit name); "{i}" a layer index. Decoder layers run ISTA' first.
RELEASED_KEYS = [
    ("blocks.{i}.layers.0.0.norm.", "blocks.{i}.norm1."),
    ("blocks.{i}.layers.0.0.fn.qkv.", "blocks.{i}.mssa.subspace."),
    ("blocks.{i}.layers.0.0.fn.to_out.0.", "blocks.{i}.mssa.proj."),
    ("blocks.{i}.layers.0.1.norm.", "blocks.{i}.norm2."),
    ("blocks.{i}.layers.0.1.fn.weight", "blocks.{i}.ista.dictionary"),
    ("decoder_blocks.{i}.layers.0.0.norm.", "decoder_blocks.{i}.norm1."),
    ("decoder_blocks.{i}.layers.0.0.fn.weight", "decoder_blocks.{i}.dictionary"),
    ("decoder_blocks.{i}.layers.0.1.norm.", "decoder_blocks.{i}.norm2."),
    ("decoder_blocks.{i}.layers.0.1.fn.qkv.", "decoder_blocks.{i}.mssa.subspace."),
    ("decoder_blocks.{i}.layers.0.1.fn.to_out.0.", "decoder_blocks.{i}.mssa.proj."),
]
RELEASED_MARKERS = (".layers.0.0.", ".layers.0.1.")


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: CrateMAE) -> Dict[str, Tensor]:
    """Map a released CRATE-MAE state dict onto ``model``. The sine-cosine tables are
    fixed functions of the grid, so for another image size they are recomputed."""
    out = rename_keys(state_dict, RELEASED_KEYS)
    for name in ("pos_embed", "decoder_pos_embed"):
        if name in out and out[name].shape != getattr(model, name).shape:
            out[name] = getattr(model, name).detach().clone()
    return out


def to_released(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """crate-lit keys -> the released CRATE-MAE key names."""
    return rename_keys(state_dict, RELEASED_KEYS, to_released=True)


CRATE_MAE_CONFIGS: Dict[str, Dict[str, Any]] = {
    "mae_crate_tiny": dict(embed_dim=384, depth=12, num_heads=6),
    "mae_crate_small": dict(embed_dim=576, depth=12, num_heads=12),
    "mae_crate_base": dict(embed_dim=768, depth=12, num_heads=12),
    "mae_crate_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "mae_crate_mini": dict(embed_dim=192, depth=4, num_heads=6, img_size=32, patch_size=8),
    "mae_crate_micro": dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8),
}
