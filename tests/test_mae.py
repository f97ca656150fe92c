"""CRATE-MAE against a plain transcription of the released forward pass (spec section 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crate_lit.models import (
    CrateMAE,
    CrateMAEClassifier,
    create_model,
    load_pretrained,
    to_released_state_dict,
)
from crate_lit.models.crate_mae import sincos_pos_embed_2d
from test_models import layer_norm, plain_layers, plain_mssa

PUBLISHED = {  # name -> (all params, trainable params)
    "mae_crate_tiny": (11_555_328, 11_404_032),
    "mae_crate_small": (25_405_824, 25_178_880),
    "mae_crate_base": (44_638_464, 44_335_872),
    "mae_crate_large": (154_274_560, 153_871_104),
}
FP32_ATOL = 1e-4


def numpy_sincos(dim, grid):
    """MAE's table as its paper describes it, in numpy: columns first, then rows."""

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid), np.arange(grid))
    table = np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table], axis=0)


def released_mae_state_dict(d, depth, patch, img, gen):
    n = (img // patch) ** 2

    def mat(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[-1])

    def ln(prefix):
        return {
            prefix + "weight": 1 + 0.1 * torch.randn(d, generator=gen, dtype=torch.float64),
            prefix + "bias": 0.1 * torch.randn(d, generator=gen, dtype=torch.float64),
        }

    table = torch.from_numpy(numpy_sincos(d, img // patch)).unsqueeze(0)
    sd = {
        "cls_token": 0.02 * torch.randn(1, 1, d, generator=gen, dtype=torch.float64),
        "mask_token": 0.02 * torch.randn(1, 1, d, generator=gen, dtype=torch.float64),
        "pos_embed": table.clone(),
        "decoder_pos_embed": table.clone(),
        "patch_embed.proj.weight": mat(d, 3, patch, patch) / patch,
        "patch_embed.proj.bias": 0.1 * torch.randn(d, generator=gen, dtype=torch.float64),
        **ln("norm."),
        "decoder_embed.weight": mat(d, d),
        "decoder_embed.bias": torch.zeros(d, dtype=torch.float64),
        **ln("decoder_norm."),
        "decoder_pred.weight": mat(patch * patch * 3, d),
        "decoder_pred.bias": 0.1 * torch.randn(patch * patch * 3, generator=gen, dtype=torch.float64),
    }
    assert sd["pos_embed"].shape == (1, n + 1, d)
    for i in range(depth):
        e, q = f"blocks.{i}.layers.0.", f"decoder_blocks.{i}.layers.0."
        sd.update(ln(e + "0.norm."))
        sd[e + "0.fn.qkv.weight"] = mat(d, d)
        sd[e + "0.fn.to_out.0.weight"], sd[e + "0.fn.to_out.0.bias"] = mat(d, d), 0.1 * mat(d)
        sd.update(ln(e + "1.norm."))
        sd[e + "1.fn.weight"] = mat(d, d)
        sd.update(ln(q + "0.norm."))
        sd[q + "0.fn.weight"] = mat(d, d)
        sd.update(ln(q + "1.norm."))
        sd[q + "1.fn.qkv.weight"] = mat(d, d)
        sd[q + "1.fn.to_out.0.weight"], sd[q + "1.fn.to_out.0.bias"] = mat(d, d), 0.1 * mat(d)
    return {k: v.float().double() for k, v in sd.items()}


def plain_mae(sd, imgs, noise, mask_ratio, patch, heads, depth, norm_pix_loss=False):
    """The released forward: keep a subset by sorted noise, put mask tokens back by gathering,
    add the decoder table, CRATE encoder (lambda 0.5), transposed decoder, masked MSE."""
    B, C, H, W = imgs.shape
    g = H // patch
    x = torch.nn.functional.conv2d(
        imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch
    )
    x = x.flatten(2).transpose(1, 2)
    L, D = x.shape[1], x.shape[2]
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].expand(-1, -1, D))
    mask = torch.ones(B, L, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    seq = torch.cat([kept, sd["mask_token"].expand(B, L - len_keep, D)], 1)
    seq = torch.gather(seq, 1, ids_restore[..., None].expand(-1, -1, D))
    x = torch.cat([sd["cls_token"].expand(B, 1, D), seq], 1) + sd["decoder_pos_embed"]
    x = plain_layers(x, sd, "blocks.{i}.layers.0.", depth, heads, 0.1, 0.5)
    x = layer_norm(x, sd, "norm.", eps=1e-6)
    for i in range(depth):
        p = f"decoder_blocks.{i}.layers.0."
        y = layer_norm(x, sd, p + "0.norm.") @ sd[p + "0.fn.weight"].T
        x = y - plain_mssa(
            layer_norm(y, sd, p + "1.norm."),
            sd[p + "1.fn.qkv.weight"],
            sd[p + "1.fn.to_out.0.weight"],
            sd[p + "1.fn.to_out.0.bias"],
            heads,
        )
    x = layer_norm(x, sd, "decoder_norm.", eps=1e-6)
    pred = (x @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"])[:, 1:]
    target = torch.stack(
        [
            imgs[:, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch]
            .permute(0, 2, 3, 1)
            .reshape(B, -1)
            for r in range(g)
            for c in range(g)
        ],
        1,
    )
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum(), pred, mask


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (total, trainable) == PUBLISHED[name]


def test_init_follows_the_release():
    model = create_model("mae_crate_micro")
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    torch.testing.assert_close(model.decoder_pos_embed[0].double(), torch.from_numpy(numpy_sincos(32, 4)))
    assert torch.equal(model.pos_embed, model.decoder_pos_embed)
    torch.testing.assert_close(
        sincos_pos_embed_2d(64, (7, 7))[0].double(), torch.from_numpy(numpy_sincos(64, 7))
    )
    assert model.norm.eps == 1e-6 and model.decoder_norm.eps == 1e-6
    assert model.blocks[0].norm1.eps == 1e-5 and model.blocks[0].ista.lambd == 0.5
    assert torch.all(model.decoder_pred.bias == 0) and torch.all(model.blocks[0].mssa.proj.bias == 0)
    assert 0.01 < model.mask_token.std() < 0.03


@pytest.mark.parametrize("norm_pix_loss,mask_ratio", [(False, 0.75), (True, 0.5), (False, 0.3)])
def test_matches_plain_released_forward(norm_pix_loss, mask_ratio):
    gen = torch.Generator().manual_seed(7)
    d, depth, heads, patch, img = 32, 2, 2, 8, 32
    sd = released_mae_state_dict(d, depth, patch, img, gen)
    model = CrateMAE(
        img_size=img, patch_size=patch, embed_dim=d, depth=depth, num_heads=heads, norm_pix_loss=norm_pix_loss
    ).eval()
    result = load_pretrained(model, {"model": {k: v.float() for k, v in sd.items()}})
    assert result.released_layout
    imgs = torch.rand(3, 3, img, img, generator=gen, dtype=torch.float64)
    noise = torch.rand(3, (img // patch) ** 2, generator=gen, dtype=torch.float64)
    loss_ref, pred_ref, mask_ref = plain_mae(sd, imgs, noise, mask_ratio, patch, heads, depth, norm_pix_loss)
    with torch.no_grad():
        loss32, pred32, mask32 = model(imgs.float(), mask_ratio=mask_ratio, noise=noise.float())
        loss, pred, mask = model.double()(imgs, mask_ratio=mask_ratio, noise=noise)
    torch.testing.assert_close(mask, mask_ref)
    torch.testing.assert_close(pred, pred_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(loss, loss_ref, atol=1e-10, rtol=1e-10)
    assert (pred32.double() - pred_ref).abs().max() < FP32_ATOL
    assert abs(loss32.item() - loss_ref.item()) < FP32_ATOL
    assert int(mask.sum()) == 3 * (16 - int(16 * (1 - mask_ratio)))


def test_mask_ratio_zero_is_a_plain_autoencoder():
    model = create_model("mae_crate_micro").eval()
    imgs = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=0.0)
    assert mask.sum() == 0 and torch.isfinite(loss)
    target = model.patchify(imgs)
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean())
    with pytest.raises(ValueError, match="mask_ratio"):
        model(imgs, mask_ratio=1.0)


def test_patchify_round_trip_and_layout():
    model = create_model("mae_crate_micro")
    imgs = torch.rand(2, 3, 32, 32)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    # patch (row 1, column 2), pixel (3, 5), channel fastest
    assert torch.equal(
        patches[0, 1 * 4 + 2, (3 * 8 + 5) * 3 : (3 * 8 + 5) * 3 + 3], imgs[0, :, 8 + 3, 16 + 5]
    )
    assert torch.equal(model.unpatchify(patches), imgs)


def test_released_round_trip_and_wrong_family_error():
    gen = torch.Generator().manual_seed(3)
    sd = {k: v.float() for k, v in released_mae_state_dict(32, 2, 8, 32, gen).items()}
    model = create_model("mae_crate_micro")
    load_pretrained(model, sd)
    back = to_released_state_dict(model)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    from crate_lit.models import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match="CRATE-MAE checkpoint of width 32, depth 2"):
        load_pretrained(create_model("crate_micro"), sd)


def test_other_image_size_recomputes_tables():
    gen = torch.Generator().manual_seed(4)
    sd = {k: v.float() for k, v in released_mae_state_dict(32, 2, 8, 32, gen).items()}
    model = create_model("mae_crate_micro", img_size=48)
    result = load_pretrained(model, sd)
    assert set(result.resampled) == {"pos_embed", "decoder_pos_embed"}
    torch.testing.assert_close(model.decoder_pos_embed[0].double(), torch.from_numpy(numpy_sincos(32, 6)))


def test_trace_exposes_encoder_layers():
    model = create_model("mae_crate_micro").eval()
    with torch.no_grad():
        trace = model.trace(torch.rand(2, 3, 32, 32))
    assert len(trace.layers) == 2
    assert trace.layers[0].attention.shape == (2, 2, 17, 17)
    assert trace.output.shape == (2, 16, 192)
    assert all(layer.sparse.min() >= 0 for layer in trace.layers)


def test_probe_classifier_loads_mae_and_probe_checkpoints():
    """A released MAE file fills the encoder (the probe head stays new); a probe's own state
    dict also restores its head; the decoder is frozen and the head is BatchNorm + Linear."""
    gen = torch.Generator().manual_seed(0)
    released = released_mae_state_dict(32, 2, 8, 32, gen)
    probe = CrateMAEClassifier(create_model("mae_crate_micro"), num_classes=5)
    result = load_pretrained(probe, released)
    assert result.released_layout and result.dropped_head
    assert torch.equal(
        to_released_state_dict(probe.encoder)["blocks.1.layers.0.1.fn.weight"],
        released["blocks.1.layers.0.1.fn.weight"].float(),
    )
    assert not any(p.requires_grad for p in probe.encoder.decoder_blocks.parameters())
    assert probe.encoder.blocks[0].ista.dictionary.requires_grad
    images = torch.randn(4, 3, 32, 32, generator=gen)
    features = probe.forward_head(probe.forward_features(images), pre_logits=True)
    assert torch.allclose(features, probe.encoder.forward_features(images)[:, 0])
    assert probe(images).shape == (4, 5)

    with torch.no_grad():
        probe.head[1].weight.normal_(generator=gen)
    again = CrateMAEClassifier(create_model("mae_crate_micro"), num_classes=5)
    load_pretrained(again, {f"model.{k}": v for k, v in probe.state_dict().items()})
    assert torch.equal(again.head[1].weight, probe.head[1].weight)
    other = CrateMAEClassifier(create_model("mae_crate_micro"), num_classes=7)
    assert load_pretrained(other, probe.state_dict()).dropped_head == sorted(
        f"head.{k}" for k in probe.head.state_dict()
    )


def test_spread_indices_cover_a_class_sorted_set():
    from crate_lit.callbacks import spread_indices

    labels = [c for c in range(10) for _ in range(50)]  # 500 images sorted by class, as image folders are
    chosen = spread_indices(len(labels), 8)
    assert chosen == spread_indices(len(labels), 8) and chosen == sorted(set(chosen))
    assert len({labels[i] for i in chosen}) == 8  # 8 images, 8 classes (the first 8 images: one)
    assert {labels[i] for i in spread_indices(len(labels), 20)} == set(range(10))
    assert spread_indices(5, 8) == [0, 1, 2, 3, 4]


def test_reconstruction_grid_shows_images_of_every_class(tmp_path):
    """A short pre-training on an ImageNet-layout folder whose validation images are sorted by
    class: the grid's images come from all of its classes, not the first one's."""

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from PIL import Image

    from crate_lit.callbacks import ReconstructionFigures
    from crate_lit.data.imagenet import ImageNetDataModule
    from crate_lit.modules import CrateMAEPretrainer
    from crate_lit.runs import config_dir

    classes = [f"n{i:08d}" for i in range(4)]
    for split, count in (("train", 2), ("val", 4)):
        for c, wnid in enumerate(classes):
            folder = tmp_path / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for k in range(count):
                Image.new("RGB", (40, 40), (60 * c, 10 * k, 100)).save(folder / f"{k}.JPEG")
    datamodule = ImageNetDataModule(
        str(tmp_path / "imagenet"), image_size=32, eval_resize=32, num_classes=4, batch_size=4,
        num_workers=0, pin_memory=False, persistent_workers=False,
    )  # fmt: skip

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):  # as crate-train composes
        composed = compose("train", overrides=["optimizer=adamw", "scheduler=constant"])
    module = CrateMAEPretrainer(
        model={"name": "mae_crate_micro", "img_size": 32},
        optimizer=OmegaConf.to_container(composed.optimizer),
        scheduler=OmegaConf.to_container(composed.scheduler),
        global_batch_size=4,
    )
    figures = ReconstructionFigures(num_images=4)
    _one_epoch_of_one_batch(module, datamodule, figures, tmp_path / "run")
    # the first 4 validation images (and the only validation batch) are all of class 0
    assert figures.labels == [0, 1, 2, 3]
    with Image.open(tmp_path / "run" / "reconstructions" / "epoch000.png") as grid:
        assert grid.format == "PNG" and grid.size[1] > grid.size[0]  # 4 rows of 3


def test_reconstruction_figures_draw_nothing_for_a_classifier(tmp_path):
    """The callback runs for every task (callbacks=default): a classifier has nothing to
    reconstruct, and the run folder gets no reconstructions/."""

    from crate_lit.callbacks import ReconstructionFigures
    from crate_lit.data import DATAMODULES
    from crate_lit.modules import CrateClassifier

    datamodule = DATAMODULES["shapes"](
        image_size=32, num_classes=3, batch_size=4, train_size=8, val_size=4, num_workers=0
    )
    module = CrateClassifier(
        model={"name": "crate_micro", "img_size": 32, "num_classes": 3},
        optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        scheduler={"name": "constant", "warmup_epochs": 0},
    )
    figures = ReconstructionFigures(num_images=2)
    _one_epoch_of_one_batch(module, datamodule, figures, tmp_path / "run")
    assert figures.labels == [] and not (tmp_path / "run" / "reconstructions").exists()


def _one_epoch_of_one_batch(module, datamodule, callback, folder) -> None:
    import lightning as L

    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
        callbacks=[callback], accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(folder),
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)


def test_visible_only_encoding_sees_the_visible_patches_and_not_the_mask_token():
    """encode_visible_only (off by default: the released model encodes every position): block 0
    gets the class token and the kept patches only, so the encoded visible tokens do not depend
    on the mask token, which in the released way they do (it is attended to); the loss is over
    the same masked patches and trains."""
    torch.manual_seed(0)
    released = create_model("mae_crate_micro").eval()
    assert released.encode_visible_only is False
    visible = create_model("mae_crate_micro", encode_visible_only=True).eval()
    visible.load_state_dict(released.state_dict())
    imgs, noise = torch.rand(3, 3, 32, 32), torch.rand(3, 16)
    lengths = []
    visible.blocks[0].register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    latent, mask = visible.forward_encoder(imgs, 0.75, noise)
    assert lengths == [1 + 4] and latent.shape == (3, 17, 32)
    torch.testing.assert_close(mask, released.forward_encoder(imgs, 0.75, noise)[1])
    kept = torch.cat([torch.ones(3, 1, dtype=torch.bool), ~mask.bool()], 1)
    for model, independent in ((visible, True), (released, False)):
        before = model.forward_encoder(imgs, 0.75, noise)[0][kept]
        with torch.no_grad():
            model.mask_token.add_(1.0)
        after = model.forward_encoder(imgs, 0.75, noise)[0][kept]
        assert torch.allclose(before, after) == independent
    loss, pred, _ = visible.train()(imgs, 0.75, noise)
    loss.backward()
    assert torch.isfinite(loss) and pred.shape == (3, 16, 192)
    assert visible.blocks[0].mssa.subspace.weight.grad is not None
    # mask_ratio 0 (the features analyses use) encodes everything either way
    torch.testing.assert_close(visible.eval().forward_features(imgs), released.forward_features(imgs))


def test_the_loss_over_masked_patches_is_the_released_branch_as_one_expression():
    model = create_model("mae_crate_micro")
    imgs, pred = torch.rand(2, 3, 32, 32), torch.rand(2, 16, 192)
    per_patch = ((pred - model.patchify(imgs)) ** 2).mean(-1)
    mask = (torch.rand(2, 16) < 0.5).float()
    torch.testing.assert_close(model.forward_loss(imgs, pred, mask), (per_patch * mask).sum() / mask.sum())
    torch.testing.assert_close(model.forward_loss(imgs, pred, torch.zeros(2, 16)), per_patch.mean())
