"""CRATE classifier: published sizes, the spec's function, shapes, timm conventions.

The reference below is a deliberately plain transcription of the spec's formulas
(explicit per-head softmax attention, the three-product ISTA step) that reads weights
by their *released* key names, so it checks the mapping and the function together.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm import get_pretrained_cfg_value, set_scriptable
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from crate_lit.models import Crate, create_model, load_pretrained, to_released_state_dict
from crate_lit.models.factory import CLASSIFIER_NAMES

PUBLISHED = {  # spec table: name -> (d, depth, heads, params with 1000 classes)
    "crate_tiny": (384, 12, 6, 6_090_856),
    "crate_small": (576, 12, 12, 13_116_328),
    "crate_base": (768, 12, 12, 22_796_008),
    "crate_large": (1024, 24, 16, 77_641_192),
}
FP32_ATOL = 1e-4  # fp32 logits vs. the plain reference (values of order 1)


# -- a plain reference of spec section 1 ------------------------------------------------
def released_state_dict(d, depth, classes, patch, img, gen):
    """Released key names and shapes, random values of a sensible scale."""
    pd = patch * patch * 3
    n = (img // patch) ** 2

    def mat(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[-1])

    def ln(size):
        return 1 + 0.1 * torch.randn(size, generator=gen, dtype=torch.float64)

    def vec(size):
        return 0.1 * torch.randn(size, generator=gen, dtype=torch.float64)

    sd = {
        "cls_token": torch.randn(1, 1, d, generator=gen, dtype=torch.float64),
        "pos_embedding": torch.randn(1, n + 1, d, generator=gen, dtype=torch.float64),
        "to_patch_embedding.1.weight": ln(pd),
        "to_patch_embedding.1.bias": vec(pd),
        "to_patch_embedding.2.weight": mat(d, pd),
        "to_patch_embedding.2.bias": vec(d),
        "to_patch_embedding.3.weight": ln(d),
        "to_patch_embedding.3.bias": vec(d),
        "mlp_head.0.weight": ln(d),
        "mlp_head.0.bias": vec(d),
        "mlp_head.1.weight": mat(classes, d),
        "mlp_head.1.bias": vec(classes),
    }
    for i in range(depth):
        p = f"transformer.layers.{i}."
        sd[p + "0.norm.weight"], sd[p + "0.norm.bias"] = ln(d), vec(d)
        sd[p + "0.fn.qkv.weight"] = mat(d, d)
        sd[p + "0.fn.to_out.0.weight"], sd[p + "0.fn.to_out.0.bias"] = mat(d, d), vec(d)
        sd[p + "1.norm.weight"], sd[p + "1.norm.bias"] = ln(d), vec(d)
        sd[p + "1.fn.weight"] = torch.empty(d, d, dtype=torch.float64).uniform_(
            -math.sqrt(6 / d), math.sqrt(6 / d), generator=gen
        )
    return sd


def layer_norm(x, sd, prefix, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[prefix + "weight"] + sd[prefix + "bias"]


def plain_mssa(x, U, W_out, b_out, heads):
    w = x @ U.T
    p = w.shape[-1] // heads
    outputs = []
    for k in range(heads):
        wk = w[..., k * p : (k + 1) * p]
        scores = wk @ wk.transpose(-1, -2) / math.sqrt(p)
        attn = torch.exp(scores - scores.max(-1, keepdim=True).values)
        attn = attn / attn.sum(-1, keepdim=True)
        outputs.append(attn @ wk)
    return torch.cat(outputs, -1) @ W_out.T + b_out


def plain_ista(x, D, eta, lam):
    # three products, literally D^T x - D^T D x (row vectors: D x is x @ D.T)
    dt_x = x @ D
    dt_d_x = (x @ D.T) @ D
    return torch.clamp(x + eta * (dt_x - dt_d_x) - eta * lam, min=0)


def plain_layers(x, sd, prefix, depth, heads, eta, lam):
    """The released layer ``prefix.format(i=...)`` applied ``depth`` times: Z + MSSA(LN Z), then
    ISTA(LN .), reading the released key names."""
    for i in range(depth):
        p = prefix.format(i=i)
        x = x + plain_mssa(
            layer_norm(x, sd, p + "0.norm."),
            sd[p + "0.fn.qkv.weight"],
            sd[p + "0.fn.to_out.0.weight"],
            sd[p + "0.fn.to_out.0.bias"],
            heads,
        )
        x = plain_ista(layer_norm(x, sd, p + "1.norm."), sd[p + "1.fn.weight"], eta, lam)
    return x


def plain_crate(sd, img, patch, heads, depth, pool="cls", eta=0.1, lam=0.1):
    B, C, H, W = img.shape
    patches = [
        img[:, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch].permute(0, 2, 3, 1).reshape(B, -1)
        for r in range(H // patch)
        for c in range(W // patch)
    ]
    x = torch.stack(patches, 1)
    x = layer_norm(x, sd, "to_patch_embedding.1.")
    x = x @ sd["to_patch_embedding.2.weight"].T + sd["to_patch_embedding.2.bias"]
    x = layer_norm(x, sd, "to_patch_embedding.3.")
    x = torch.cat([sd["cls_token"].expand(B, 1, -1), x], 1) + sd["pos_embedding"]
    x = plain_layers(x, sd, "transformer.layers.{i}.", depth, heads, eta, lam)
    pooled = x[:, 0] if pool == "cls" else x.mean(1)
    pooled = layer_norm(pooled, sd, "mlp_head.0.")
    return pooled @ sd["mlp_head.1.weight"].T + sd["mlp_head.1.bias"], x


# -- published sizes --------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_parameter_counts(name):
    d, depth, heads, params = PUBLISHED[name]
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert (model.embed_dim, len(model.blocks), model.blocks[0].mssa.num_heads) == (d, depth, heads)
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 3 * d * d + 5 * d


def test_released_init_scales():
    model = create_model("crate_small")
    dictionary = model.blocks[0].ista.dictionary
    bound = math.sqrt(6 / 576)
    assert dictionary.abs().max() <= bound and dictionary.abs().max() > 0.95 * bound
    assert 0.9 < model.pos_embed.std() < 1.1 and 0.7 < model.cls_token.std() < 1.3


# -- the function ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "img,patch,heads,depth,pool", [(32, 8, 2, 2, "cls"), (32, 4, 4, 3, "mean"), (48, 16, 3, 2, "cls")]
)
def test_matches_plain_reference(img, patch, heads, depth, pool):
    gen = torch.Generator().manual_seed(img + patch + depth)
    d, classes = 48, 7
    # fp32 values (what a checkpoint holds), the reference computes in fp64 on them
    sd = {k: v.float().double() for k, v in released_state_dict(d, depth, classes, patch, img, gen).items()}
    model = Crate(
        img_size=img,
        patch_size=patch,
        num_classes=classes,
        embed_dim=d,
        depth=depth,
        num_heads=heads,
        global_pool=pool,
    ).eval()
    result = load_pretrained(model, {k: v.float() for k, v in sd.items()})
    assert result.released_layout and not result.missing and not result.unexpected
    images = torch.randn(3, 3, img, img, generator=gen, dtype=torch.float64)
    expected, tokens = plain_crate(sd, images, patch, heads, depth, pool)
    with torch.no_grad():
        got32 = model(images.float())
        model.double()
        got64 = model(images)
        features = model.forward_features(images)
    torch.testing.assert_close(got64, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(features, tokens, atol=1e-10, rtol=1e-10)
    assert (got32.double() - expected).abs().max() < FP32_ATOL


def test_ista_output_is_nonnegative_and_sparse():
    model = create_model("crate_micro").eval()
    trace = model.trace(torch.randn(4, 3, 32, 32))
    for layer in trace.layers:
        assert layer.sparse.min() >= 0
        assert (layer.sparse == 0).any()  # relu with a positive threshold zeroes entries
    assert model.forward_features(torch.randn(2, 3, 32, 32)).min() >= 0


@pytest.mark.parametrize("img,patch", [(32, 4), (32, 8), (48, 16), (64, 8), ((32, 48), 16)])
def test_output_shapes_for_other_sizes(img, patch):
    model = create_model("crate_micro", img_size=img, patch_size=patch, num_classes=5)
    h, w = (img, img) if isinstance(img, int) else img
    x = torch.randn(2, 3, h, w)
    n = (h // patch) * (w // patch)
    assert model(x).shape == (2, 5)
    assert model.forward_features(x).shape == (2, n + 1, 32)
    assert model.pos_embed.shape == (1, n + 1, 32)


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        create_model("crate_micro", img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        create_model("crate_micro", embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown model 'crate_tinny'.*crate_tiny"):
        create_model("crate_tinny")
    with pytest.raises(ValueError, match="global_pool"):
        create_model("crate_micro", global_pool="max")


def test_trace_is_the_same_function():
    model = create_model("crate_micro").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        trace = model.trace(x)
        torch.testing.assert_close(trace.output, model(x), atol=1e-5, rtol=1e-5)
    first = trace.layers[0]
    assert first.attention.shape == (2, 2, 17, 17)
    torch.testing.assert_close(first.attention.sum(-1), torch.ones(2, 2, 17))
    assert first.subspace.shape == (2, 2, 17, 16)
    assert first.compressed.shape == first.sparse.shape == (2, 17, 32)
    assert trace.stack("sparse").shape == (2, 2, 17, 32)


def test_released_round_trip_is_identity():
    gen = torch.Generator().manual_seed(0)
    sd = {k: v.float() for k, v in released_state_dict(32, 2, 10, 8, 32, gen).items()}
    model = create_model("crate_micro")
    load_pretrained(model, {"state_dict": {"module." + k: v for k, v in sd.items()}})
    back = to_released_state_dict(model)
    assert back.keys() == sd.keys()
    for key in sd:
        assert torch.equal(back[key], sd[key]), key


# -- timm conventions -------------------------------------------------------------------
def test_timm_registry_and_conventions():
    model = timm.create_model("crate_small", num_classes=10)
    assert isinstance(model, Crate) and model.num_classes == 10 and model.num_features == 576
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert model.default_cfg["classifier"] == "head"
    assert "crate_tiny" in timm.list_models("crate_*")
    micro = timm.create_model("crate_micro")
    x = torch.randn(2, 3, 32, 32)
    assert micro.forward_head(micro.forward_features(x), pre_logits=True).shape == (2, 32)
    micro.reset_classifier(3)
    assert micro(x).shape == (2, 3)
    micro.reset_classifier(0)
    assert micro(x).shape == (2, 32)


def test_forward_intermediates_and_features_only():
    model = create_model("crate_micro").eval()
    x = torch.randn(2, 3, 32, 32)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 2 and inter[0].shape == (2, 32, 4, 4)
    torch.testing.assert_close(final, model.forward_features(x))
    torch.testing.assert_close(inter[-1].flatten(2).transpose(1, 2), final[:, 1:])
    feats = timm.create_model("crate_micro", features_only=True, out_indices=(0, 1))
    outs = feats(x)
    assert [o.shape for o in outs] == [(2, 32, 4, 4)] * 2
    assert feats.feature_info.channels() == [32, 32]


# -- timm's FX and TorchScript procedures ----------------------------------------------------
# timm's own suite (its tests/test_models.py) runs every registered model through tracing and
# scripting; the CRATE entries have to pass those checks as timm runs them, so the steps below
# follow timm's: its input size rule, its tracer settings, its choice of output nodes.
TIMM_FX_TARGET, TIMM_FX_MAX = 128, 256  # timm's TARGET_FWD_FX_SIZE / MAX_FWD_FX_SIZE
TIMM_JIT_TARGET, TIMM_JIT_MAX = 128, 320  # timm's TARGET_JIT_SIZE / MAX_JIT_SIZE
TIMM_CRATE = timm.list_models("crate*", name_matches_cfg=True)


def timm_input_size(name, target):
    """timm's test input: a fixed-size config keeps its size, others are capped at ``target``."""
    size = get_pretrained_cfg_value(name, "input_size")
    if get_pretrained_cfg_value(name, "fixed_input_size") or max(size) <= target:
        return size
    return get_pretrained_cfg_value(name, "min_input_size") or tuple(min(s, target) for s in size)


def timm_fx_model(model):
    """The model as timm's tests trace it: torchvision's feature extractor with timm's no-trace
    modules and functions, returning the last node of the train graph and of the eval graph."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(),
        autowrap_functions=get_notrace_functions(),
        param_shapes_constant=True,
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model,
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs,
    )


# every registered name is one class with another config, so the CPU-sized ones at their own
# 32 px (the size timm's tests feed them) take the code path of all; one published size at 224 px
# (about 25 s for the three tests) is kept as a slow case. All ten passed once on 2 CPUs in 7 min.
# CRATE-alpha's CPU-sized ones take its code path (its blocks and patch embedding) likewise.
TIMM_CASES = [
    "crate_micro",
    "crate_mini",
    "crate_alpha_micro",
    "crate_alpha_mini",
    pytest.param("crate_tiny", marks=pytest.mark.slow),
]


def test_timm_lists_every_crate_classifier():
    assert sorted(TIMM_CRATE) == sorted(CLASSIFIER_NAMES)
    assert {"crate_micro", "crate_mini", "crate_tiny", "crate_alpha_base"} <= set(TIMM_CRATE)


@pytest.mark.parametrize("name", TIMM_CASES)
def test_timm_forward_fx(name):
    model = timm.create_model(name, pretrained=False).eval()
    size = timm_input_size(name, TIMM_FX_TARGET)
    if max(size) > TIMM_FX_MAX:
        pytest.skip("timm skips fixed input sizes over its FX limit")
    with torch.inference_mode():
        x = torch.randn(1, *size)
        expected = model(x)
        got = torch.cat(tuple(timm_fx_model(model)(x).values()))
    assert torch.equal(got, expected)
    assert expected.shape[0] == 1 and not expected.isnan().any()


def scriptable_timm_model(name: str) -> tuple:
    """The model as timm's TorchScript tests build it (scriptable mode, eval) and their input
    size; skipped where timm skips it."""
    size = timm_input_size(name, TIMM_JIT_TARGET)
    if max(size) > TIMM_JIT_MAX:
        pytest.skip("timm skips fixed input sizes over its TorchScript limit")
    with set_scriptable(True):
        model = timm.create_model(name, pretrained=False)
    return model.eval(), size


@pytest.mark.parametrize("name", TIMM_CASES)
def test_timm_forward_fx_torchscript(name):
    model, size = scriptable_timm_model(name)
    scripted = torch.jit.script(timm_fx_model(model))
    with torch.inference_mode():
        x = torch.randn(1, *size)
        got = torch.cat(tuple(scripted(x).values()))
        expected = model(x)
    assert got.shape[0] == 1 and not got.isnan().any()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", TIMM_CASES)
def test_timm_forward_torchscript(name):
    model, size = scriptable_timm_model(name)
    scripted = torch.jit.script(model)
    x = torch.randn(1, *size)
    got = scripted(x)
    assert got.shape[0] == 1 and not got.isnan().any()
    with torch.no_grad():
        torch.testing.assert_close(got, model(x))


def test_bf16_autocast_runs_close():
    model = create_model("crate_micro").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - model(x)).abs().max() < 0.25


def test_fast_ista_equals_three_product_form():
    block = create_model("crate_micro").blocks[0].ista.double()
    x = torch.randn(4, 9, 32, dtype=torch.float64)
    expected = plain_ista(x, block.dictionary.detach(), 0.1, 0.1)
    torch.testing.assert_close(block(x), expected, atol=1e-12, rtol=1e-12)
    assert F.relu(x).shape == block(x).shape


def test_benchmark_plain_reference_is_the_same_function():
    from crate_lit.benchmarks import PlainCrate

    model = create_model("crate_micro").eval()
    plain = PlainCrate(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_torch_compile_matches_eager_and_trains():
    # TorchDynamo's capture and AOTAutograd's backward, without inductor's code generation (40 s
    # of C++ compilation on the CI machine): test_training's compile switch trains through inductor
    model = create_model("crate_micro")
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
    loss = F.cross_entropy(compiled(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert model.blocks[0].ista.dictionary.grad is not None
    assert torch.isfinite(model.blocks[0].ista.dictionary.grad).all()


@pytest.mark.parametrize(
    "name,kwargs", [("crate_micro", {}), ("crate_alpha_micro", {}), ("mae_crate_micro", {}),
                    ("mae_crate_micro", {"encode_visible_only": True})],
)  # fmt: skip
def test_the_training_forward_and_loss_is_one_graph(name, kwargs):
    """What compile=true compiles traces whole: a graph break would split every training step
    in two graphs with a device-to-host wait between them."""
    torch._dynamo.reset()
    model = create_model(name, **kwargs).train()
    images = torch.randn(4, 3, 32, 32)
    if name.startswith("mae_"):
        explained = torch._dynamo.explain(lambda x, noise: model(x, 0.75, noise)[0])(
            images, torch.rand(4, 16)
        )
    else:
        labels = torch.tensor([0, 1, 2, 3])
        explained = torch._dynamo.explain(lambda x: F.cross_entropy(model(x), labels, label_smoothing=0.1))(
            images
        )
    assert explained.graph_break_count == 0, [str(reason.reason) for reason in explained.break_reasons]
    assert explained.graph_count == 1
