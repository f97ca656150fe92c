"""Optimizers and learning-rate schedules (crate_lit.optim): the schedule a real Trainer run
follows, step by step, and the scheduler configs' keys against what the schedules read."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
import yaml

from commands import REPO
from crate_lit.configs import CommandLineError, check_command_line
from crate_lit.data.shapes import ShapesDataModule
from crate_lit.modules import CrateClassifier
from crate_lit.optim import SCHEDULES, build_optimizer, build_scheduler

PEAK = 1e-3
# 64 training images in batches of 16: 4 batches per epoch
TRAIN_SIZE, BATCH = 64, 16


class LearningRates(L.Callback):
    """The learning rate each optimizer step is taken with (read before the batch: Lightning
    steps the schedule after each optimizer step)."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def train(scheduler: dict, **trainer_args) -> tuple[list[float], float]:
    """A real fit of crate_micro on 32 px shapes on the CPU (seconds): the rates of the
    training batches, and the rate the optimizer holds once training has ended."""
    L.seed_everything(0, workers=True)
    data = ShapesDataModule(
        image_size=32, train_size=TRAIN_SIZE, val_size=16, batch_size=BATCH, cache_dir=None
    )
    module = CrateClassifier(
        model={"name": "crate_micro", "img_size": 32, "num_classes": 10},
        optimizer={"name": "adamw", "lr": PEAK, "weight_decay": 0.05},
        scheduler=scheduler,
    )
    rates = LearningRates()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=[rates],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **trainer_args,
    )
    trainer.fit(module, datamodule=data)
    return rates.rates, trainer.optimizers[0].param_groups[0]["lr"]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_warmup_epochs_are_epochs_of_the_loader_when_max_steps_ends_the_run_sooner(accumulate):
    # 10 epochs asked for, max_steps stops after two epochs' worth of optimizer steps: the
    # warm-up is still one epoch (4 batches = 4 / accumulate steps), not a tenth of the steps
    steps_per_epoch = TRAIN_SIZE // BATCH // accumulate
    rates, last = train(
        {"name": "warmup_cosine", "warmup_epochs": 1, "min_lr_ratio": 0.01},
        max_epochs=10,
        max_steps=2 * steps_per_epoch,
        accumulate_grad_batches=accumulate,
    )
    steps = rates[::accumulate]  # each optimizer step's rate, from its first batch
    assert len(steps) == 2 * steps_per_epoch
    warmup = [PEAK * (k + 1) / steps_per_epoch for k in range(steps_per_epoch)]
    assert steps[:steps_per_epoch] == pytest.approx(warmup)  # the last step of epoch 1 at the peak
    # then the cosine: from the peak (WarmupCosine's first step after the ramp), falling
    cosine = steps[steps_per_epoch:]
    assert cosine[0] == pytest.approx(PEAK)
    assert all(a > b for a, b in zip(cosine, cosine[1:], strict=False))
    assert last == pytest.approx(0.01 * PEAK)  # and ending at min_lr_ratio where max_steps ends


def test_warmup_longer_than_the_run_is_cut_at_its_end():
    # 2 epochs warm-up in a run of 3 steps: the ramp of 8 steps would never reach the peak,
    # so the warm-up takes the whole run and its last step trains at the peak
    rates, _ = train(
        {"name": "warmup_cosine", "warmup_epochs": 2, "min_lr_ratio": 0.0}, max_epochs=5, max_steps=3
    )
    assert rates == pytest.approx([PEAK / 3, 2 * PEAK / 3, PEAK])


def test_constant_schedule_warms_up_then_holds_the_peak():
    rates, last = train({"name": "constant", "warmup_epochs": 0.5}, max_epochs=2)
    assert rates == pytest.approx([PEAK / 2, PEAK] + [PEAK] * 6)  # half an epoch: 2 of 4 steps
    assert last == pytest.approx(PEAK)


def test_each_scheduler_config_has_the_keys_its_schedule_reads():
    # a key in conf/scheduler/<name>.yaml that the schedule ignores reads as a setting that
    # does nothing (constant.yaml's min_lr_ratio did)
    configs = sorted((REPO / "conf" / "scheduler").glob("*.yaml"))
    assert sorted(p.stem for p in configs) == sorted(SCHEDULES)
    for path in configs:
        cfg = yaml.safe_load(path.read_text())
        assert cfg["name"] == path.stem
        assert sorted(cfg) == sorted(["name", *SCHEDULES[path.stem]]), path.name


def test_min_lr_ratio_is_no_setting_of_the_constant_schedule(caplog):
    # on the command line: an unknown key, named before Hydra runs
    with pytest.raises(CommandLineError, match="scheduler.min_lr_ratio"):
        check_command_line("train", ["scheduler=constant", "scheduler.min_lr_ratio=0.5"])
    check_command_line("train", ["scheduler=warmup_cosine", "scheduler.min_lr_ratio=0.5"])
    # brought in by an experiment's cosine settings: said to be ignored, and it is
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    with caplog.at_level(logging.WARNING, logger="crate_lit.optim"):
        schedule = build_scheduler(
            optimizer, {"name": "constant", "warmup_epochs": 0, "min_lr_ratio": 0.0}, 10, 5
        ).lr_lambdas[0]
    assert "scheduler=constant does not use scheduler.min_lr_ratio" in caplog.text
    assert [schedule(step) for step in range(10)] == [1.0] * 10


def test_fractional_and_missing_warmup_epochs():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    cosine = {"name": "warmup_cosine", "min_lr_ratio": 0.1}
    assert (
        build_scheduler(optimizer, {**cosine, "warmup_epochs": 1.5}, 100, 10).lr_lambdas[0].warmup_steps == 15
    )
    assert build_scheduler(optimizer, cosine, 100, 10).lr_lambdas[0].warmup_steps == 0
    with pytest.raises(ValueError, match="warmup_epochs must be >= 0"):
        build_scheduler(optimizer, {**cosine, "warmup_epochs": -1}, 100, 10)
    with pytest.raises(ValueError, match="needs a training loader with a length"):
        build_scheduler(optimizer, {**cosine, "warmup_epochs": 1}, 100, float("inf"))


@pytest.mark.parametrize("name", ["adamw", "lion", "sgd"])
def test_weight_decay_only_on_matrices(name):
    # timm's public param_groups_weight_decay: biases, norms and 1-d parameters undecayed
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = build_optimizer(model, {"name": name, "lr": 0.1, "weight_decay": 0.05})
    decay = {g["weight_decay"]: {tuple(p.shape) for p in g["params"]} for g in optimizer.param_groups}
    assert decay == {0.05: {(3, 4)}, 0.0: {(3,)}}
    assert isinstance(
        optimizer, {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}.get(name, torch.optim.Optimizer)
    )


def _decayed(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}


def test_the_decay_rules_choose_the_parameters_weight_decay_applies_to():
    from crate_lit.models import create_model

    model = create_model("crate_alpha_micro")
    args = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1}
    decayed = {
        rule: _decayed(build_optimizer(model, {**args, "decayed": rule}), model)
        for rule in ("matrices", "model", "layer_weights")
    }
    two_d = {n for n, p in model.named_parameters() if p.ndim >= 2}
    assert decayed["matrices"] == two_d  # the class token (1, 1, d) and position table too
    assert decayed["model"] == two_d - {"cls_token", "pos_embed"}
    # big_vision's ".*/kernel": Linear and convolution weights, not the dictionaries D and D1
    assert decayed["layer_weights"] == {
        "patch_embed.proj.weight", "head.weight",
        *(f"blocks.{i}.mssa.{w}.weight" for i in range(2) for w in ("subspace", "proj")),
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown optimizer.decayed 'kernels'"):
        build_optimizer(model, {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "decayed": "kernels"})


def test_layer_decay_gives_each_layer_its_rate_and_the_schedule_scales_them_all():
    """MAE fine-tuning's rule on a 2-layer encoder with layer_decay 0.5: the head at the peak,
    layer 2 at half, layer 1 at a quarter, the embedding at an eighth; each group then follows
    the warm-up + cosine of a real Trainer run at its own scale."""
    from crate_lit.models import create_model
    from crate_lit.models.crate_mae import CrateMAEClassifier

    model = CrateMAEClassifier(create_model("mae_crate_micro"), 10, probe=False)
    args = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "layer_decay": 0.5, "decayed": "model"}
    optimizer = build_optimizer(model, args)
    names = {id(p): n for n, p in model.named_parameters()}
    rate = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert rate["head.weight"] == rate["encoder.norm.weight"] == pytest.approx(1e-3)
    assert rate["encoder.blocks.1.ista.dictionary"] == pytest.approx(5e-4)
    assert rate["encoder.blocks.0.mssa.subspace.weight"] == pytest.approx(2.5e-4)
    assert rate["encoder.patch_embed.proj.weight"] == rate["encoder.cls_token"] == pytest.approx(1.25e-4)
    assert not any(n.startswith("encoder.decoder") for n in rate)  # frozen: not optimised
    assert "encoder.cls_token" not in _decayed(optimizer, model)  # MAE's no_weight_decay

    scheduler = build_scheduler(
        optimizer, {"name": "warmup_cosine", "warmup_epochs": 1, "min_lr_ratio": 0.0}, 8, 4
    )
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    peak = [g["initial_lr"] for g in optimizer.param_groups]
    ratios = {round(g["lr"] / base, 12) for g, base in zip(optimizer.param_groups, peak, strict=True)}
    assert len(ratios) == 1 and 0 < ratios.pop() < 1  # one schedule, every layer at its own scale
