"""Mixup/cutmix: timm's per-image Mixup drawn from the images' keys, the soft targets, the loss
and soft-target accuracy of a classifier trained on them, a real run through the CLI, and the
one-line errors of the mixup block."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from torchmetrics.classification import MulticlassAccuracy

from commands import QUICK, crate_train, metric_rows, one_line_error
from crate_lit.data.augment import (
    MIXING_OFF,
    _log_gamma,
    beta_symmetric,
    mix_images,
    mix_targets,
    mixing_parameters,
    mixup_cutmix,
)
from crate_lit.seeding import stable_seed

BOTH = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5}


def epoch_keys(epoch: int, n: int, seed: int = 42) -> torch.Tensor:
    """The keys EpochSampler gives images 0..n-1 in ``epoch``."""
    return torch.tensor([stable_seed(seed, epoch, i) for i in range(n)], dtype=torch.int64)


def test_the_same_keys_mix_alike_and_another_epochs_keys_otherwise() -> None:
    images, labels = torch.randn(16, 3, 24, 40), torch.arange(16) % 10
    keys = epoch_keys(0, 16)
    mixed, targets = mixup_cutmix(images, labels, keys, 10, **BOTH)
    again, targets_again = mixup_cutmix(images, labels, keys, 10, **BOTH)
    assert torch.equal(mixed, again) and torch.equal(targets, targets_again)
    other, other_targets = mixup_cutmix(images, labels, epoch_keys(1, 16), 10, **BOTH)
    assert not torch.equal(other, mixed) and not torch.equal(other_targets, targets)
    # an image's draws are its key's alone, wherever it is in the batch (its partner is not)
    lam, cut, box = mixing_parameters(keys, 24, 40, **BOTH)
    order = torch.randperm(16)
    shuffled = mixing_parameters(keys[order], 24, 40, **BOTH)
    assert all(torch.equal(a, b[order]) for a, b in zip(shuffled, (lam, cut, box), strict=True))


@pytest.mark.parametrize("alpha", [0.8, 1.0])
def test_beta_draws_have_the_moments_and_distribution_of_beta(alpha: float) -> None:
    n = 100_000
    x = beta_symmetric(epoch_keys(0, 1)[0] + torch.arange(n, dtype=torch.int64) * 7_919, alpha, stream=6)
    assert x.dtype == torch.float32 and bool(((x >= 0) & (x <= 1)).all())
    assert abs(float(x.mean()) - 0.5) < 0.004
    assert abs(float(x.var()) - 1 / (4 * (2 * alpha + 1))) < 0.002
    # the whole distribution: torch's own Beta sampler's CDF, within sampling noise
    torch.manual_seed(0)
    reference = torch.distributions.Beta(alpha, alpha).sample((n,))
    grid = torch.linspace(0.02, 0.98, 49)
    cdf = (x[:, None] <= grid).float().mean(0)
    ref_cdf = (reference[:, None] <= grid).float().mean(0)
    assert float((cdf - ref_cdf).abs().max()) < 0.01


def test_gamma_draws_whose_proposals_all_fail_take_a_fixed_value() -> None:
    # u = 0 everywhere: z = 0, v = 1, and log(1 - 0) = 0 is not < 0, so every proposal fails
    u = torch.zeros(3, 25)
    assert torch.equal(_log_gamma(u, 2.0), torch.full((3,), math.log(2.0 - 1 / 3)))


def test_the_shares_mixed_and_cut_are_prob_and_switch_prob() -> None:
    keys = torch.arange(20_000, dtype=torch.int64) * 104_729
    lam, cut, _ = mixing_parameters(keys, 32, 32, 0.8, 1.0, prob=0.7, switch_prob=0.3)
    mixed = (lam < 1) | cut  # a box too small to hold a pixel leaves lam at 1
    assert abs(float(mixed.float().mean()) - 0.7) < 0.015
    assert abs(float(cut[mixed].float().mean()) - 0.3) < 0.015
    assert bool((mixing_parameters(keys, 32, 32, 0.8, 0.0)[1] == 0).all())  # mixup alone
    assert bool(mixing_parameters(keys[:100], 32, 32, 0.0, 1.0)[1].all())  # cutmix alone
    assert bool((mixing_parameters(keys, 32, 32, **MIXING_OFF)[0] == 1).all())  # off


def test_cutmix_lam_is_the_share_of_the_image_not_pasted() -> None:
    b, h, w = 8, 24, 40
    images = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w).contiguous()
    for epoch in range(20):
        keys = epoch_keys(epoch, b)
        lam, cut, box = mixing_parameters(keys, h, w, cutmix_alpha=1.0)
        out = mix_images(images, lam, cut, box)
        partner = torch.arange(b - 1, -1, -1, dtype=torch.float32).view(b, 1, 1)
        pasted = (out == partner[:, None]).all(1)  # (B, H, W): the partner's pixels
        assert torch.equal(pasted | (out == images).all(1), torch.ones(b, h, w, dtype=torch.bool))
        assert torch.equal(lam, 1 - pasted.flatten(1).sum(1).float() / (h * w))
        # the pasted pixels are the box
        for i in range(b):
            top, bottom, left, right = box[i].tolist()
            expected = torch.zeros(h, w, dtype=torch.bool)
            expected[top:bottom, left:right] = True
            assert torch.equal(pasted[i], expected)


def test_mixing_is_timms_per_image_loop_with_the_same_draws() -> None:
    # timm's Mixup._mix_elem, image by image, given this batch's lam, kind and box
    images, keys = torch.randn(10, 3, 16, 20), epoch_keys(3, 10)
    lam, cut, box = mixing_parameters(keys, 16, 20, **BOTH)
    assert bool(cut.any()) and bool((~cut & (lam < 1)).any())  # both kinds in this batch
    reference = images.clone()
    for i in range(10):
        j = 9 - i
        if cut[i]:
            top, bottom, left, right = box[i].tolist()
            reference[i][:, top:bottom, left:right] = images[j][:, top:bottom, left:right]
        else:
            reference[i] = images[i] * lam[i] + images[j] * (1 - lam[i])
    assert torch.allclose(mix_images(images, lam, cut, box), reference, atol=1e-6)


def test_targets_sum_to_one_and_are_the_mixed_one_hot_labels() -> None:
    labels, keys = torch.tensor([0, 3, 3, 7, 1, 9]), epoch_keys(0, 6)
    lam, _, _ = mixing_parameters(keys, 32, 32, **BOTH)
    targets = mix_targets(labels, lam, 10)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    expected = torch.zeros(6, 10)
    for i in range(6):
        expected[i, labels[i]] += lam[i]
        expected[i, labels[5 - i]] += 1 - lam[i]
    assert torch.allclose(targets, expected, atol=1e-7)
    assert torch.allclose(targets, mixup_target(labels, 10, lam[:, None], smoothing=0.0))


def _classifier(mixup: dict | None):
    from crate_lit.modules import CrateClassifier

    torch.manual_seed(0)
    module = CrateClassifier(
        model={"name": "crate_micro", "img_size": 32, "num_classes": 10},
        optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
        scheduler={"name": "constant", "warmup_epochs": 0},
        label_smoothing=0.1,
        mixup=mixup,
    )
    return module.eval()  # the same logits in the step and in the reference below


def _step(module, batch) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer to log to
        return module.training_step(batch, 0)


def test_the_loss_and_accuracy_of_a_mixed_batch_are_timms_and_the_soft_target_accuracy() -> None:
    module = _classifier(BOTH)
    assert module.hparams.mixup == BOTH
    images, labels, keys = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), epoch_keys(0, 8)
    loss = _step(module, (images, labels, keys))
    lam, _, _ = mixing_parameters(keys, 32, 32, **BOTH)
    mixed, targets = mixup_cutmix(images, labels, keys, 10, **BOTH)
    with torch.no_grad():
        logits = module(mixed)
    timm_loss = SoftTargetCrossEntropy()(logits, mixup_target(labels, 10, lam[:, None], smoothing=0.1))
    assert torch.allclose(loss, timm_loss, atol=1e-6)
    # the soft-target accuracy: the unsmoothed target's weight on the predicted class
    soft = targets[torch.arange(8), logits.argmax(1)].mean()
    assert torch.allclose(module.train_acc.compute(), soft)
    assert 0 < float(soft) < 1 and float(soft) * 8 != round(float(soft) * 8)  # not a count of hits


def test_without_mixing_the_loss_and_accuracy_are_the_plain_ones() -> None:
    module = _classifier(None)
    assert module.hparams.mixup == MIXING_OFF
    images, labels = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    loss = _step(module, (images, labels, epoch_keys(0, 8)))
    with torch.no_grad():
        logits = module(images)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))
    top1 = MulticlassAccuracy(10, top_k=1, average="micro")(logits, labels)
    assert torch.equal(module.train_acc.compute(), top1)


def test_the_modules_default_is_the_shipped_configs_mixup_block() -> None:
    from hydra import compose, initialize_config_dir

    from crate_lit.runs import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train")
    assert dict(cfg.mixup) == MIXING_OFF


@pytest.mark.slow
def test_a_run_with_mixup_and_cutmix_trains_and_repeats_exactly(tmp_path: Path) -> None:
    args = [*QUICK, "mixup.mixup_alpha=0.8", "mixup.cutmix_alpha=1.0"]
    runs = []
    for name in ("one", "two"):
        proc = crate_train(*args, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = metric_rows(tmp_path / name)
        runs.append([{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows])
    assert runs[0] == runs[1]
    losses = [float(r["train/loss"]) for r in runs[0] if r["train/loss"]]
    accuracies = [float(r["train/acc1"]) for r in runs[0] if r["train/acc1"]]
    assert losses and all(math.isfinite(x) for x in losses)
    assert len(accuracies) == 2 and all(0 <= a <= 1 for a in accuracies)
    # 64 images an epoch: top-1 would be a count of 64ths, the soft-target accuracy is not
    assert any(a * 64 != round(a * 64) for a in accuracies), accuracies
    ckpt = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["mixup"] == BOTH


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mixup.mixup_alpha=-0.2"], "mixup.mixup_alpha must be a number >= 0"),
        (["mixup.cutmix_alpha=abc"], "mixup.cutmix_alpha must be a number >= 0"),
        (["mixup.prob=1.5"], "mixup.prob is a probability in [0, 1], got 1.5"),
        (["mixup.switch_prob=-1"], "mixup.switch_prob is a probability in [0, 1], got -1"),
        (["+mixup.alpha=0.8"], "unknown key mixup.alpha"),
        (
            ["task=mae", "model=mae_crate_micro", "mixup.mixup_alpha=0.8"],
            "task=mae has none; set mixup.mixup_alpha=0 mixup.cutmix_alpha=0",
        ),
    ],
)
def test_mixup_values_that_cannot_work_are_one_line_errors(tmp_path: Path, overrides, message) -> None:
    proc = crate_train(*QUICK, *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert message in one_line_error(proc)
