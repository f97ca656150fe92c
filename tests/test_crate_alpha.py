"""CRATE-alpha: published sizes, the function of the released code, its checkpoint layouts
(PyTorch and JAX .npz), the ablation switches, and one-line errors for files of another model.

The reference below is a plain transcription of the released model's formulas, reading weights
by their released PyTorch key names: two ISTA steps from zero written as the released einsums,
explicit per-head softmax attention, LayerNorm eps 1e-6 inside the layers and 1e-5 in the head.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crate_lit.models import CheckpointMismatchError, CrateAlpha, create_model, load_pretrained
from crate_lit.models import to_released_state_dict as released
from crate_lit.models.crate_alpha import CRATE_ALPHA_CONFIGS

ATOL = 1e-5


def layer_norm(x, sd, prefix, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[prefix + "weight"] + sd[prefix + "bias"]


def plain_crate_alpha(sd, img, patch, heads, depth, eta=0.1, lam=0.1, decoupled=True, residual=True):
    x = F.conv2d(img, sd["conv1.weight"], sd["conv1.bias"], stride=patch)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], 1, -1), x], 1) + sd["pos_embedding"]
    for i in range(depth):
        p = f"transformer.layers.{i}."
        y = layer_norm(x, sd, p + "0.norm.", 1e-6)
        w = y @ sd[p + "0.fn.qkv.weight"].T
        dh = w.shape[-1] // heads
        outs = []
        for k in range(heads):
            wk = w[..., k * dh : (k + 1) * dh]
            scores = wk @ wk.transpose(-1, -2) * dh**-0.5
            attn = torch.exp(scores - scores.max(-1, keepdim=True).values)
            outs.append((attn / attn.sum(-1, keepdim=True)) @ wk)
        x = x + torch.cat(outs, -1) @ sd[p + "0.fn.to_out.0.weight"].T
        y = layer_norm(x, sd, p + "1.norm.", 1e-6)
        D = sd[p + "1.fn.D"]
        z1 = F.relu(eta * torch.einsum("pd,nlp->nld", D, y) - eta * lam)
        dz1 = torch.einsum("dp,nlp->nld", D, z1)
        z2 = F.relu(z1 - eta * torch.einsum("pd,nlp->nld", D, dz1 - y) - eta * lam)
        out = torch.einsum("dp,nlp->nld", sd[p + "1.fn.D1"] if decoupled else D, z2)
        x = x + out if residual else out
    pooled = layer_norm(x[:, 0], sd, "mlp_head.0.", 1e-5)
    return pooled @ sd["mlp_head.1.weight"].T + sd["mlp_head.1.bias"]


def randomised(model: CrateAlpha) -> CrateAlpha:
    """Norms and biases away from their 1 / 0 start, so that a swapped or dropped one shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, value in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                value.add_(0.1 * torch.randn(value.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize(
    "name,params", [("crate_alpha_base", 72_328_936), ("crate_alpha_large", 253_650_920)]
)
def test_published_parameter_counts(name, params):
    """B/16 72.33 M and L/14 253.65 M with a 1000-class head (the paper's counts)."""
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    ista = model.blocks[0].ista
    assert ista.dictionary.shape == ista.synthesis.shape == (model.embed_dim, 4 * model.embed_dim)
    assert model.blocks[0].mssa.proj.bias is None
    assert model.blocks[0].norm1.eps == model.blocks[0].norm2.eps == 1e-6
    assert model.head_norm.eps == 1e-5


@pytest.mark.parametrize("heads,img,scale", [(2, 32, 1.0), (4, 48, 1.0), (2, 32, 1e-3)])
def test_matches_the_released_formulas(heads, img, scale):
    """``scale`` shrinks the tokens entering the first layer until the LayerNorms' eps (1e-6
    there, 1e-5 in the head) shows in the output."""
    model = randomised(create_model("crate_alpha_micro", num_heads=heads, img_size=img))
    with torch.no_grad():
        for value in (model.cls_token, model.pos_embed, *model.patch_embed.parameters()):
            value.mul_(scale)
    sd = released(model)
    x = torch.randn(3, 3, img, img)
    expected = plain_crate_alpha({k: v.double() for k, v in sd.items()}, x.double(), 8, heads, 2)
    torch.testing.assert_close(model(x).double(), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("decoupled,residual", [(False, True), (True, False), (False, False)])
def test_ablation_switches_are_the_paper_s_steps(decoupled, residual):
    """decoupled=False maps the code back with D itself; residual=False lets the step's output
    replace the stream (CRATE's way)."""
    model = randomised(create_model("crate_alpha_micro", decoupled=decoupled, residual=residual))
    assert (model.blocks[0].ista.synthesis is None) == (not decoupled)
    sd = {k: v.double() for k, v in released(model).items()}
    x = torch.randn(2, 3, 32, 32)
    expected = plain_crate_alpha(sd, x.double(), 8, 2, 2, decoupled=decoupled, residual=residual)
    torch.testing.assert_close(model(x).double(), expected, atol=ATOL, rtol=0)


def test_without_the_overcomplete_step_the_layer_is_crate_s_ista():
    model = create_model("crate_alpha_micro", overcomplete=False, decoupled=False, residual=False).eval()
    block = model.blocks[0]
    assert block.ista.dictionary.shape == (32, 32)
    z = torch.randn(2, 17, 32)
    y = block.norm2(z)
    d = block.ista.dictionary
    step = F.relu(y + 0.1 * ((y @ d) - (y @ d.T) @ d) - 0.1 * 0.1)  # relu(x + eta D^T(x - Dx) - eta lambda)
    torch.testing.assert_close(block.ista(y), step, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="decoupled=True needs overcomplete=True"):
        create_model("crate_alpha_micro", overcomplete=False)


def test_released_layout_round_trip_and_key_names():
    model = randomised(create_model("crate_alpha_micro"))
    sd = released(model)
    layer = {k.split(".", 3)[3] for k in sd if k.startswith("transformer.layers.0.")}
    assert layer == {
        "0.norm.weight", "0.norm.bias", "0.fn.qkv.weight", "0.fn.to_out.0.weight",
        "1.norm.weight", "1.norm.bias", "1.fn.D", "1.fn.D1",
    }  # fmt: skip
    assert {"conv1.weight", "conv1.bias", "pos_embedding", "cls_token", "mlp_head.0.weight"} <= set(sd)
    assert sd["conv1.weight"].shape == (32, 3, 8, 8)
    other = create_model("crate_alpha_micro")
    # as a DataParallel file with the training state around it
    result = load_pretrained(other, {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3})
    assert result.released_layout and not result.missing
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(other.eval()(x), model(x))


def _as_jax(sd: dict, depth: int) -> dict:
    """The released PyTorch weights under the JAX code's flax paths and layouts."""
    arrays = {
        "embedding/kernel": sd["conv1.weight"].permute(2, 3, 1, 0),  # (p, p, in, out)
        "embedding/bias": sd["conv1.bias"],
        "cls": sd["cls_token"],
        "pos_embedding": sd["pos_embedding"],
        "encoder_norm/scale": sd["mlp_head.0.weight"],
        "encoder_norm/bias": sd["mlp_head.0.bias"],
        "head/kernel": sd["mlp_head.1.weight"].T,  # (in, out)
        "head/bias": sd["mlp_head.1.bias"],
    }
    for i in range(depth):
        jax, p = f"Transformer/encoderblock_{i}/", f"transformer.layers.{i}."
        attention = jax + "MultiHeadDotProductSubspaceAttention_0/"
        arrays |= {
            jax + "LayerNorm_0/scale": sd[p + "0.norm.weight"],
            jax + "LayerNorm_0/bias": sd[p + "0.norm.bias"],
            attention + "proj/kernel": sd[p + "0.fn.qkv.weight"].T,
            attention + "out/kernel": sd[p + "0.fn.to_out.0.weight"].T,
            jax + "LayerNorm_1/scale": sd[p + "1.norm.weight"],
            jax + "LayerNorm_1/bias": sd[p + "1.norm.bias"],
            jax + "OvercompleteISTABlock_0/D": sd[p + "1.fn.D"],
            jax + "OvercompleteISTABlock_0/D1": sd[p + "1.fn.D1"],
        }
    return {k: v.contiguous().numpy() for k, v in arrays.items()}


@pytest.mark.parametrize("prefix", ["", "params/"])
def test_the_jax_npz_layout_loads(tmp_path, prefix):
    model = randomised(create_model("crate_alpha_micro"))
    path = tmp_path / "crate_alpha.npz"
    np.savez(path, **{prefix + k: v for k, v in _as_jax(released(model), 2).items()})
    other = create_model("crate_alpha_micro")
    assert load_pretrained(other, path).released_layout
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(other.eval()(x), model(x))


def test_another_patch_size_and_resolution_reinitialise_the_patch_embedding(tmp_path):
    """The fine-tuning recipe's load: a B/16-shaped file at 64 px into a /8 model at 48 px: the
    position table is resampled, the patch embedding's kernel re-initialised (its bias kept),
    the head of another class count replaced, the head's LayerNorm kept."""
    source = randomised(create_model("crate_alpha_micro", patch_size=16, img_size=64, num_classes=1000))
    torch.save(released(source), tmp_path / "b16.pth")
    target = create_model("crate_alpha_micro", patch_size=8, img_size=48, num_classes=10)
    kernel = target.patch_embed.proj.weight.clone()
    result = load_pretrained(target, tmp_path / "b16.pth")
    assert result.reinitialised == ["patch_embed.proj.weight"]
    assert result.resampled == ["pos_embed"] and result.dropped_head == ["head.bias", "head.weight"]
    assert torch.equal(target.patch_embed.proj.weight, kernel)
    assert torch.equal(target.patch_embed.proj.bias, source.patch_embed.proj.bias)
    assert torch.equal(target.head_norm.weight, source.head_norm.weight)
    assert torch.equal(target.blocks[1].ista.synthesis, source.blocks[1].ista.synthesis)
    assert target.pos_embed.shape == (1, 37, 32)


@pytest.mark.parametrize(
    "build,write,found",
    [
        ("crate_micro", "crate_alpha_micro", "CRATE-alpha checkpoint of width 32, depth 2, patch 8"),
        ("crate_alpha_micro", "crate_micro", "CRATE checkpoint of width 32, depth 2, patch 8"),
        ("crate_alpha_large", "crate_alpha_base", "CRATE-alpha checkpoint of width 768, depth 12, patch 16"),
        ("mae_crate_micro", "crate_alpha_micro", "CRATE-alpha checkpoint of width 32, depth 2, patch 8"),
    ],
)
def test_a_file_of_another_model_is_named_in_one_line(tmp_path, build, write, found):
    """What the file holds, and the named model it fits: a CRATE-alpha file for CRATE and the
    reverse, a B/16 file for L/14, a CRATE-alpha file for a CRATE-MAE model."""
    size = {"img_size": 224} if build == "crate_alpha_large" else {"img_size": 32}
    torch.save(released(create_model(write, **size)), tmp_path / "file.pth")
    with pytest.raises(CheckpointMismatchError) as caught:
        load_pretrained(create_model(build, **size), tmp_path / "file.pth")
    message = str(caught.value)
    assert "\n" not in message and f"It is a {found}, which is {write}: build that model" in message
    assert f"model={write}" in message


def test_an_npz_with_missing_arrays_names_them(tmp_path):
    arrays = _as_jax(released(create_model("crate_alpha_micro")), 2)
    del arrays["Transformer/encoderblock_1/OvercompleteISTABlock_0/D1"]
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(CheckpointMismatchError) as caught:
        load_pretrained(create_model("crate_alpha_micro"), tmp_path / "partial.npz")
    message = str(caught.value)
    assert "1 missing [blocks.1.ista.synthesis]" in message and "\n" not in message
    (tmp_path / "broken.npz").write_bytes((tmp_path / "partial.npz").read_bytes()[:-200])
    with pytest.raises(CheckpointMismatchError, match="broken.npz cannot be read"):
        load_pretrained(create_model("crate_alpha_micro"), tmp_path / "broken.npz")


def test_trace_is_the_same_function_and_keeps_the_sparse_code():
    model = randomised(create_model("crate_alpha_micro"))
    x = torch.randn(4, 3, 32, 32)
    trace = model.trace(x)
    torch.testing.assert_close(trace.output, model(x), atol=1e-6, rtol=0)
    code = trace.layers[0].sparse
    assert code.shape == (4, 17, 4 * 32) and (code >= 0).all()
    assert 0.0 < float((code == 0).float().mean()) < 1.0  # thresholded: some zeros, not all
    block = model.blocks[0]
    torch.testing.assert_close(
        block.ista.decode(code), block.ista(block.norm2(trace.layers[0].compressed)), atol=1e-6, rtol=0
    )


def test_every_size_table_entry_builds():
    for name, config in CRATE_ALPHA_CONFIGS.items():
        with torch.device("meta"):
            model = create_model(name)
        assert model.embed_dim == config["embed_dim"] and len(model.blocks) == config["depth"]
        assert model.patch_embed.patch_size == config.get("patch_size", 16), name
        assert math.isclose(model.blocks[0].mssa.scale, (config["embed_dim"] // config["num_heads"]) ** -0.5)


@pytest.mark.slow
def test_trains_with_the_live_monitor_and_is_analysed_from_its_run_and_released_files(tmp_path):
    """crate-train on CRATE-alpha logs the white-box monitor's numbers, whose sparsity is that of
    the code A2; crate-analyze reads the run's checkpoint and a released .npz (model= named)."""
    from commands import QUICK, metric_rows, run_command

    args = [a for a in QUICK if not a.startswith(("model=", "trainer.max_epochs"))]
    train = run_command(
        "crate-train", "model=crate_alpha_micro", *args, "trainer.max_epochs=1",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    (row,) = [r for r in metric_rows(tmp_path / "run") if r.get("whitebox/sparsity_l2")]
    assert 0.0 < float(row["whitebox/sparsity_l2"]) < 1.0 and float(row["whitebox/coding_rate_l1"]) > 0

    model = create_model("crate_alpha_micro")
    np.savez(tmp_path / "released.npz", **{"params/" + k: v for k, v in _as_jax(released(model), 2).items()})
    for source, extra in (("run/checkpoints/last.ckpt", []), ("released.npz", ["model=crate_alpha_micro"])):
        out = tmp_path / source.split("/")[0].replace(".", "_")
        proc = run_command(
            "crate-analyze", f"ckpt_path={tmp_path / source}", *extra, "num_images=16", "data.image_size=32",
            f"hydra.run.dir={out}", cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        assert report["model"] == "crate_alpha_micro" and report["model_class"] == "CrateAlpha"
        assert len(report["layerwise"]) == 2 and 0.0 <= report["layerwise"][0]["sparsity_mean"] <= 1.0
