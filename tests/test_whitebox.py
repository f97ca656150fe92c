"""White-box measurements: known answers for coding rate, sparsity, masks, IoU, PCA; figures."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from crate_lit import figures, measures
from crate_lit.models import create_model
from crate_lit.models.crate import LayerTrace

EPS = 0.01


def direct_rate(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The spec's formula read literally: N x N logdet of every head, float64."""
    _, _, n, p = w.shape
    x = torch.nn.functional.normalize(w.to(torch.float64), dim=-1)
    eye = torch.eye(n, dtype=torch.float64)
    return 0.5 * torch.logdet(eye + p / (n * eps) * x @ x.transpose(-2, -1)).sum(-1)


# -- coding rate ----------------------------------------------------------------------------
def test_coding_rate_orthonormal_tokens_closed_form():
    n, p = 4, 8
    w = torch.eye(p)[:n].reshape(1, 1, n, p)  # N orthonormal tokens, p >= N (N x N path)
    expected = 0.5 * n * math.log(1 + p / (n * EPS))
    assert measures.coding_rate(w).item() == pytest.approx(expected, rel=1e-6)
    assert measures.coding_rate(w).shape == (1,)


def test_coding_rate_gram_path_closed_form():
    # p < N: 16 tokens, 4 copies of each basis vector of R^4 -> W^T W = 4 I_4
    n, p = 16, 4
    w = torch.eye(p).repeat(n // p, 1).reshape(1, 1, n, p)
    expected = 0.5 * p * math.log(1 + 4 * p / (n * EPS))
    assert measures.coding_rate(w).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n,p", [(4, 8), (16, 8)])  # both code paths
def test_coding_rate_identical_tokens_rank_one(n, p):
    w = torch.randn(p).expand(1, 1, n, p).clone()
    expected = 0.5 * math.log(1 + p / EPS)  # single eigenvalue N * p / (N eps), whatever N
    assert measures.coding_rate(w).item() == pytest.approx(expected, rel=1e-6)


def test_coding_rate_heads_add_and_scale_invariance():
    n, p = 4, 8
    ortho = torch.eye(p)[:n]
    same = torch.ones(n, p)
    w = torch.stack([ortho, same]).unsqueeze(0)  # (1, 2, N, p)
    expected = 0.5 * n * math.log(1 + p / (n * EPS)) + 0.5 * math.log(1 + p / EPS)
    assert measures.coding_rate(w).item() == pytest.approx(expected, rel=1e-6)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 10, 6, generator=gen)
    scales = torch.rand(3, 2, 10, 1, generator=gen) * 50 + 0.01
    torch.testing.assert_close(
        measures.coding_rate(x * scales), measures.coding_rate(x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("n,p", [(10, 4), (4, 10), (7, 7)])
def test_coding_rate_matches_direct_logdet(n, p):
    gen = torch.Generator().manual_seed(n * 100 + p)
    w = torch.randn(3, 2, n, p, generator=gen, dtype=torch.float64)
    got = measures.coding_rate(w, eps=0.05)
    assert got.shape == (3,) and got.dtype == torch.float64
    torch.testing.assert_close(got, direct_rate(w, eps=0.05), rtol=1e-10, atol=1e-10)


# -- sparsity -------------------------------------------------------------------------------
def test_sparsity_known_tensor():
    z = torch.arange(1.0, 25.0).reshape(2, 3, 4)
    z[0, 0, 1] = z[0, 1, 3] = z[0, 2, 0] = 0.0  # 3 zeros among 12 entries of image 0
    torch.testing.assert_close(measures.sparsity(z), torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(measures.normalized_l0(z), torch.tensor([0.75, 1.0]))


def test_layerwise_stats_known_values():
    n, p = 4, 8
    subspace = torch.eye(p)[:n].expand(3, 1, n, p)  # same orthonormal tokens in 3 images
    sparse = torch.ones(3, 2, 2)
    sparse[0, 0, 0] = 0.0  # sparsities 0.25, 0, 0
    layer = LayerTrace(subspace, torch.zeros(3, 1, n, n), sparse, sparse)
    stats = measures.layerwise_stats(SimpleNamespace(layers=[layer, layer]))
    assert [s["layer"] for s in stats] == [1, 2]
    s = stats[0]
    assert s["coding_rate_mean"] == pytest.approx(0.5 * n * math.log(1 + p / (n * EPS)), rel=1e-6)
    assert s["coding_rate_std"] == pytest.approx(0.0, abs=1e-6)
    assert s["sparsity_mean"] == pytest.approx(0.25 / 3)
    assert s["sparsity_std"] == pytest.approx(math.sqrt(2) / 12)  # population std of (1/4, 0, 0)
    assert s["l0_mean"] == pytest.approx(1 - 0.25 / 3)
    assert all(isinstance(v, (float, int)) for v in s.values())


# -- IoU and masks --------------------------------------------------------------------------
def test_iou_known_masks():
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    right = ~left
    middle = torch.zeros(4, 4, dtype=torch.bool)
    middle[:, 1:3] = True  # overlaps left in 4 pixels, union 12
    empty = torch.zeros(4, 4, dtype=torch.bool)
    pred = torch.stack([left, left, left, empty, empty])
    target = torch.stack([right, left, middle, empty, left])
    torch.testing.assert_close(measures.iou(pred, target), torch.tensor([0.0, 1.0, 1 / 3, 1.0, 0.0]))
    assert measures.iou(pred.reshape(5, 1, 4, 4), target.reshape(5, 1, 4, 4)).shape == (5, 1)


def test_cls_attention_maps_takes_row_zero_without_class_column():
    b, h, gh, gw = 2, 3, 2, 3
    n = 1 + gh * gw
    i = torch.arange(n).view(1, 1, n, 1)
    j = torch.arange(n).view(1, 1, 1, n)
    att = 1000.0 * torch.arange(b).view(b, 1, 1, 1) + 100.0 * torch.arange(h).view(1, h, 1, 1) + 10 * i + j
    maps = measures.cls_attention_maps(att, (gh, gw))
    assert maps.shape == (b, h, gh, gw)
    assert maps[1, 2, 1, 0].item() == 1000 + 200 + 0 + (1 + 1 * gw + 0)  # row 0, patch (1, 0)
    assert maps[0, 0].flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    with pytest.raises(ValueError):
        measures.cls_attention_maps(att, (2, 2))


def test_dino_masks_rule():
    # mass [0.5, 0.3, 0.1, 0.1] laid out as [[0.1, 0.5], [0.1, 0.3]]
    maps = torch.tensor([[0.1, 0.5], [0.1, 0.3]]).reshape(1, 1, 2, 2)

    def kept(keep, m=maps):
        return measures.dino_masks(m, keep)[0, 0].tolist()

    assert kept(0.6) == [[False, True], [False, True]]  # 0.5 < 0.6, then 0.8 reached
    assert kept(0.6, 7 * maps) == [[False, True], [False, True]]  # mass is normalised
    assert kept(0.5) == [[False, True], [False, False]]  # 0.5 reaches 0.5 exactly
    assert kept(0.85) == [[True, True], [False, True]]  # tie broken by position
    assert kept(1.0) == [[True, True], [True, True]]
    assert kept(0.0) == [[False, True], [False, False]]  # the top patch is always kept
    assert measures.dino_masks(torch.tensor([0.5, 0.4, 0.1]).reshape(1, 1, 1, 3), 0.9).tolist() == [
        [[[True, True, False]]]
    ]
    rand = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    masks = measures.dino_masks(rand, 0.01)
    assert masks.dtype == torch.bool and masks.shape == rand.shape
    assert (masks.sum((-2, -1)) >= 1).all()


def test_upsample_masks_nearest():
    m = torch.tensor([[True, False], [False, True]]).expand(2, 3, 2, 2)
    up = measures.upsample_masks(m, (4, 6))
    assert up.shape == (2, 3, 4, 6) and up.dtype == torch.bool
    assert up[0, 0].int().tolist() == [[1, 1, 1, 0, 0, 0]] * 2 + [[0, 0, 0, 1, 1, 1]] * 2


def test_centre_box():
    box = measures.centre_box_mask((8, 8))
    assert box.sum().item() == 16 and box[2:6, 2:6].all()
    assert measures.centre_box_mask((4, 8)).nonzero().tolist() == [[1, c] for c in range(2, 6)] + [
        [2, c] for c in range(2, 6)
    ]


def test_segmentation_scores_known_example():
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    gt[0, :4, :4] = True  # top-left quarter
    gt[1, 2:6, 2:6] = True  # exactly the centre box
    maps = torch.zeros(2, 2, 4, 4)  # patch grid 4 x 4, 2 pixels per patch
    maps[0, 0, :2, :2] = 1.0  # head 0 equals the ground truth at patch level
    maps[1, 0, 1:3, 1:3] = 1.0
    maps[:, 1, 3, 3] = 1.0  # head 1: one background patch (4 pixels)
    scores = measures.segmentation_scores(maps, gt, keep=1.0, upsample="nearest")
    assert scores["per_head_iou"] == pytest.approx([1.0, 0.0])
    assert scores["best_head"] == 0 and scores["best_head_iou"] == pytest.approx(1.0)
    assert scores["union_iou"] == pytest.approx(16 / 20)
    assert scores["all_foreground_iou"] == pytest.approx(16 / 64)
    assert scores["centre_box_iou"] == pytest.approx((4 / 28 + 1.0) / 2)
    assert scores["best_head_iou"] > max(scores["all_foreground_iou"], scores["centre_box_iou"])
    # a soft map whose foreground holds 70% of the mass is exact at the default keep=0.6
    soft = torch.full((1, 1, 4, 4), 0.3 / 12)
    soft[0, 0, :2, :2] = torch.tensor([[0.2, 0.2], [0.15, 0.15]])
    assert measures.segmentation_scores(soft, gt[:1], upsample="nearest")["best_head_iou"] == pytest.approx(
        1.0
    )
    assert scores["keep"] == 1.0 and scores["upsample"] == "nearest"


def test_upsample_maps_bilinear():
    ramp = torch.arange(4.0).expand(2, 3, 4, 4)  # columns 0..3, 2 px per patch
    up = measures.upsample_maps(ramp, (8, 8))
    assert up.shape == (2, 3, 8, 8) and up.dtype == torch.float32
    # pixel centres lie a quarter patch either side of a patch centre; the borders are clamped
    assert up[0, 0, 0].tolist() == [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]
    torch.testing.assert_close(
        measures.upsample_maps(torch.full((1, 1, 3, 3), 0.2), (12, 12)), torch.full((1, 1, 12, 12), 0.2)
    )


def test_attention_masks_modes():
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 3, 4, 4, generator=gen)
    nearest = measures.attention_masks(maps, (8, 8), keep=0.6, upsample="nearest")
    assert torch.equal(nearest, measures.upsample_masks(measures.dino_masks(maps, 0.6), (8, 8)))
    bilinear = measures.attention_masks(maps, (8, 8), keep=0.6, upsample="bilinear")
    assert bilinear.shape == (2, 3, 8, 8) and bilinear.dtype == torch.bool
    assert torch.equal(bilinear, measures.dino_masks(measures.upsample_maps(maps, (8, 8)), 0.6))
    with pytest.raises(ValueError, match="upsample must be one of"):
        measures.attention_masks(maps, (8, 8), upsample="bicubic")


def test_bilinear_masks_follow_an_outline_better_than_patch_blocks():
    # The ideal attention map of a disk is the foreground share of every patch. On a 4 x 4 grid
    # its patch-block mask cannot follow the round outline; the interpolated mask comes closer.
    c = torch.arange(32.0) + 0.5
    gt = ((c.view(-1, 1) - 14.0) ** 2 + (c.view(1, -1) - 17.0) ** 2 <= 9.0**2).unsqueeze(0)
    ideal = torch.nn.functional.avg_pool2d(gt.float().unsqueeze(0), 8)  # (1, 1, 4, 4)
    near = measures.segmentation_scores(ideal, gt, upsample="nearest")["best_head_iou"]
    bil = measures.segmentation_scores(ideal, gt, upsample="bilinear")["best_head_iou"]
    assert bil > near + 0.05


# -- PCA ------------------------------------------------------------------------------------
def test_pca_feature_maps_orders_patches_along_main_direction():
    b, gh, gw, d = 2, 2, 3, 5
    t = torch.arange(b * gh * gw, dtype=torch.float32)  # position along the main direction
    main = torch.tensor([3.0, 1.0, 0.5, 0.0, 0.0])
    minor = torch.tensor([0.0, 0.0, 0.0, 1.0, -1.0])
    s = torch.tensor([1.0, -1.0, -1.0, 1.0]).repeat(b * gh * gw // 4)  # mean 0, uncorrelated with t
    feats = (t[:, None] * main + 0.1 * s[:, None] * minor + 7.0).reshape(b, gh * gw, d)
    maps = measures.pca_feature_maps(feats, (gh, gw), n_components=3)
    assert maps.shape == (b, 3, gh, gw)
    assert maps.min() >= 0 and maps.max() <= 1
    torch.testing.assert_close(maps[:, 0], (t / t.max()).reshape(b, gh, gw), rtol=0, atol=1e-5)
    torch.testing.assert_close(maps[:, 1].flatten(), (s + 1) / 2, rtol=0, atol=1e-5)
    masks = measures.pca_masks(maps)
    assert masks.dtype == torch.bool and masks.shape == (b, gh, gw)
    assert masks.flatten().tolist() == (t > 5.5).tolist()


# -- figures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro_trace():
    torch.manual_seed(0)
    model = create_model("crate_micro").eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        return images, model.trace(images)


def check_png(path, size=None):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode in ("RGB", "RGBA")
        assert image.size[0] > 0 and image.size[1] > 0
        if size is not None:
            assert image.size == size


def test_layerwise_stats_on_trace_and_plot(micro_trace, tmp_path):
    _, trace = micro_trace
    stats = measures.layerwise_stats(trace)
    assert len(stats) == 2
    for s in stats:
        assert all(math.isfinite(v) for v in s.values())
        assert 0.0 <= s["sparsity_mean"] <= 1.0 and s["coding_rate_mean"] > 0
    check_png(figures.plot_layerwise(stats, tmp_path / "layerwise.png"))


def test_layerwise_panels_say_what_they_plot():
    """The second panel plots the non-zero fraction (1 - sparsity): its title and its axis
    must both say so, not call the curve "sparsity" when it falls as sparsity rises."""
    stats = [
        dict(layer=1, coding_rate_mean=50.0, coding_rate_std=1.0, sparsity_mean=0.2, sparsity_std=0.01),
        dict(layer=2, coding_rate_mean=40.0, coding_rate_std=1.0, sparsity_mean=0.7, sparsity_std=0.02),
    ]
    for s in stats:
        s["l0_mean"] = 1 - s["sparsity_mean"]
    rate, density = figures.layerwise_figure(stats).axes
    assert list(density.lines[0].get_ydata()) == pytest.approx([0.8, 0.3])
    for text in (density.get_title(), density.get_ylabel()):
        assert "non-zero" in text.lower()
    assert not density.get_title().lower().startswith("sparsity")
    assert list(rate.lines[0].get_ydata()) == [50.0, 40.0] and "R^c" in rate.get_ylabel()
    assert all(ax.get_xlabel() for ax in (rate, density))


def test_attention_figure_has_title_row_labels_and_a_colour_bar(micro_trace):
    images, trace = micro_trace
    maps = measures.cls_attention_maps(trace.layers[-1].attention, trace.extras["grid_size"])
    masks = measures.attention_masks(maps, images.shape[-2:])
    fig = figures.attention_figure(
        images, maps, masks, layer=2, depth=2, source="best-epoch009.ckpt", epoch=9, mask_rule="keep 0.6"
    )
    title = fig.get_suptitle()
    assert "layer 2 of 2" in title and "best-epoch009.ckpt" in title and "epoch 9" in title
    grid = [ax for ax in fig.axes if ax.get_subplotspec() is not None]
    assert len(grid) == 2 * 2 * 3  # 2 images x (maps, masks) rows, image + 2 heads
    # every row is labelled: image i, attention or its masks
    labels = [grid[row * 3].get_ylabel() for row in range(4)]
    assert labels == [
        "image 1\nattention",
        "image 1\nmasks (keep 0.6)",
        "image 2\nattention",
        "image 2\nmasks (keep 0.6)",
    ]
    assert [ax.get_title() for ax in grid[:3]] == ["image", "head 0", "head 1"]
    # one colour bar for every head's map, which share its scale
    (bar,) = [ax for ax in fig.axes if ax.get_subplotspec() is None]
    assert "attention" in bar.get_ylabel()
    heat = [ax.images[0] for ax in grid[1:3]]
    assert all(h.get_clim() == heat[0].get_clim() for h in heat)
    assert heat[0].get_clim() == (0.0, pytest.approx(float(maps[:2].max())))
    # without masks and details: still a title, a label per row, the bar
    fig = figures.attention_figure(images, maps, None)
    assert "Class-token attention" in fig.get_suptitle()
    grid = [ax for ax in fig.axes if ax.get_subplotspec() is not None]
    assert [grid[row * 3].get_ylabel() for row in range(2)] == ["image 1\nattention", "image 2\nattention"]
    assert len(fig.axes) == len(grid) + 1


def test_the_two_mae_figures_have_distinct_accurate_titles(micro_trace):
    images, _ = micro_trace
    kw = dict(mask_ratio=0.75, row_labels=["class 3", "class 7"])
    pasted = figures.reconstruction_figure(images, images * 0.5, images, visible_pasted=True, **kw)
    raw = figures.reconstruction_figure(
        images, images * 0.5, images, visible_pasted=False, source="x.pth", **kw
    )
    titles = [[ax.get_title() for ax in fig.axes[:3]] for fig in (pasted, raw)]
    assert titles[0][:2] == titles[1][:2] == ["original", "masked input\n(75 % removed)"]
    assert titles[0][2] != titles[1][2]
    assert "pasted back" in pasted.get_suptitle() and "not pasted" not in pasted.get_suptitle()
    assert "not pasted back" in raw.get_suptitle()
    assert "x.pth" in raw.get_suptitle()
    assert [pasted.axes[i * 3].get_ylabel() for i in range(2)] == ["class 3", "class 7"]


def test_figures_write_pngs(micro_trace, tmp_path):
    images, trace = micro_trace
    maps = measures.cls_attention_maps(trace.layers[-1].attention, trace.extras["grid_size"])
    masks = measures.dino_masks(maps)
    path = figures.plot_attention_grid(
        images, maps, masks, tmp_path / "sub" / "attention.png", layer=2, depth=2
    )
    check_png(path)
    with Image.open(path) as image:  # 1 + 2 heads (and the colour bar) wide, 2 rows per image
        assert image.size[0] < image.size[1]
    check_png(figures.plot_attention_grid(images, maps, None, tmp_path / "attention_plain.png"))
    noise = torch.randn_like(images)  # out of [0, 1]: clamped
    recon = figures.plot_reconstructions(
        images, images * 0.5, noise, tmp_path / "recon.png", visible_pasted=True
    )
    check_png(recon)
    feats = trace.layers[-1].subspace[:, :, 1:].transpose(1, 2).flatten(2)  # (B, P, heads * p)
    pca = measures.pca_feature_maps(feats, trace.extras["grid_size"])
    check_png(figures.plot_pca_maps(images, pca, tmp_path / "pca.png"))
