"""The training system through the real CLI: every experiment on real-format files, resume,
DDP over two CPU processes, multirun sweeps, wandb offline, and bad-input errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from wandb.proto import wandb_internal_pb2

from commands import QUICK, crate_train, metric_rows, one_line_error, summary_of
from crate_lit.models import create_model, to_released_state_dict
from formats import add_truncated

pytestmark = pytest.mark.slow

# two optimizer steps and one validation batch on the experiment's own model, at 32 px
STEPS = [
    "data.image_size=32",
    "data.batch_size=2",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]
IMAGENET_FIXTURE = ["data.num_classes=3", "data.eval_resize=36"]
NO_MODEL = [arg for arg in QUICK if not arg.startswith("model=")]
# what a run measures of itself: differs between any two runs
TIMINGS = ("whitebox/seconds", "perf/images_per_sec", "perf/data_wait_share")


def _without_timings(rows: list) -> list:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def _only_run(root: Path) -> Path:
    runs = list(root.glob("outputs/*/*/summary.json"))
    assert len(runs) == 1, runs
    return runs[0].parent


@pytest.mark.parametrize(
    "experiment", ["imagenet_crate_tiny", "imagenet_paper", "cifar_finetune", "mae_pretrain", "linear_probe"]
)
def test_every_experiment_runs_on_real_format_files(tmp_path, experiment, request):
    """Each published recipe, unchanged but for data size and step count, on the fixture files
    (ImageFolder JPEG/PNG/grayscale/CMYK; CIFAR python batches)."""
    if experiment == "cifar_finetune":
        root = request.getfixturevalue("cifar10_root")
        # a released-layout CRATE-S file with ImageNet's 1000 classes: the head must be replaced
        released = tmp_path / "CRATE_small.pth"
        torch.save(to_released_state_dict(create_model("crate_small")), released)
        extra = [f"model.pretrained={released}"]
    else:
        root = request.getfixturevalue("imagenet_root")
        extra = IMAGENET_FIXTURE
        if experiment == "mae_pretrain":  # no labels: the 3 class folders pass the default count of 1000
            # and fp32: the recipe's bf16 autocast on a CPU without bf16 units made its two steps of
            # the 44 M-parameter model take 30 s (imagenet_crate_tiny runs the recipes' bf16 path)
            extra = [a for a in extra if not a.startswith("data.num_classes=")]
            extra.append("trainer.precision=32-true")
    if experiment == "linear_probe":  # the recipe refuses a backbone without weights
        pretrained = tmp_path / "mae_crate_base.pth"
        torch.save({"model": to_released_state_dict(create_model("mae_crate_base", img_size=32))}, pretrained)
        extra = [*extra, f"model.pretrained={pretrained}"]
    proc = crate_train(f"experiment={experiment}", f"data.root={root}", *STEPS, *extra, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = _only_run(tmp_path)
    summary = summary_of(run_dir)
    assert summary["global_step"] == 2
    checkpoint = torch.load(summary["checkpoints"]["last"], map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    if experiment == "mae_pretrain":
        assert "val/loss" in summary["metrics"] and "val/acc1" not in summary["metrics"]
        # lr = base lr x global batch / 256; AdamW (0.9, 0.95); no decay on 1-D parameters
        assert groups[0]["initial_lr"] == pytest.approx(1.5e-4 * 2 / 256)
        assert tuple(groups[0]["betas"]) == (0.9, 0.95)
        assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]
        assert len(list((run_dir / "reconstructions").glob("epoch*.png"))) == 1
    else:
        assert 0.0 <= summary["metrics"]["val/acc1"] <= 1.0
    expected_model = {
        "imagenet_crate_tiny": "crate_tiny",
        "imagenet_paper": "crate_tiny",
        "cifar_finetune": "crate_small",
        "mae_pretrain": "mae_crate_base",
        "linear_probe": "mae_crate_base",
    }[experiment]
    assert hparams["model"]["name"] == expected_model
    assert hparams["model"]["img_size"] == 32  # from the data config, by interpolation
    if experiment == "cifar_finetune":
        assert checkpoint["state_dict"]["model.head.weight"].shape == (10, 576)
        assert groups[0]["initial_lr"] == pytest.approx(5e-5)
    if experiment == "imagenet_paper":
        assert groups[0]["initial_lr"] == pytest.approx(2.4e-4)
        assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.5]  # none on 1-D parameters
    if experiment == "linear_probe":
        # the probe's Linear weight and bias (its BatchNorm has no affine parameters): nothing else
        assert sum(len(g["params"]) for g in groups) == 2


@pytest.mark.parametrize("experiment", ["crate_alpha_in21k", "crate_alpha_in1k_finetune", "mae_finetune"])
def test_the_crate_alpha_and_mae_fine_tuning_recipes_run_on_real_format_files(
    tmp_path, experiment, imagenet_root
):
    """Each recipe unchanged but for data size, step count and a CPU-sized model of its family
    (the recipes' own B-sized models write checkpoints of about a gigabyte with their optimizer
    state; the configs' composition is checked in test_configs): what each recipe sets reaches
    the optimizer, the model and the data."""
    model = {"mae_finetune": "mae_crate_micro"}.get(experiment, "crate_alpha_micro")
    extra = [f"model={model}", "trainer.precision=32-true", *IMAGENET_FIXTURE]
    if experiment == "crate_alpha_in1k_finetune":
        # a pre-trained file of another patch size and resolution, with a 1000-class head
        source = create_model("crate_alpha_micro", patch_size=16, img_size=64, num_classes=1000)
        torch.save({"state_dict": to_released_state_dict(source)}, tmp_path / "in21k.pth")
        extra.append(f"model.pretrained={tmp_path / 'in21k.pth'}")
    if experiment == "mae_finetune":
        torch.save({"model": to_released_state_dict(create_model("mae_crate_micro"))}, tmp_path / "mae.pth")
        extra.append(f"model.pretrained={tmp_path / 'mae.pth'}")
    proc = crate_train(f"experiment={experiment}", f"data.root={imagenet_root}", *STEPS, *extra, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(_only_run(tmp_path))
    assert summary["global_step"] == 2 and 0.0 <= summary["metrics"]["train/acc1"] <= 1.0
    checkpoint = torch.load(summary["checkpoints"]["last"], map_location="cpu", weights_only=True)
    hparams, groups = checkpoint["hyper_parameters"], checkpoint["optimizer_states"][0]["param_groups"]
    assert hparams["mixup"]["mixup_alpha"] == 0.8 and hparams["mixup"]["cutmix_alpha"] == 1.0
    state = checkpoint["state_dict"]
    decayed = sum(len(g["params"]) for g in groups if g["weight_decay"] > 0)
    if experiment.startswith("crate_alpha"):
        # weight decay on the Linear and convolution weights only: 2 per layer, patch embedding, head
        assert decayed == 2 * 2 + 2 and {g["weight_decay"] for g in groups} == {0.0, 0.1}
        assert {tuple(g["betas"]) for g in groups} == {(0.9, 0.95)}
        lr = 1.6e-4 if experiment == "crate_alpha_in1k_finetune" else 8e-4
        assert [g["initial_lr"] for g in groups] == pytest.approx([lr] * len(groups))
        assert state["model.head.weight"].shape == (3, 32)
    assert hparams["label_smoothing"] == (0.0 if experiment == "crate_alpha_in21k" else 0.1)
    if experiment == "crate_alpha_in1k_finetune":
        assert state["model.patch_embed.proj.weight"].shape == (32, 3, 8, 8)  # re-initialised at /8
    if experiment == "mae_finetune":
        # layer-wise decay 0.65 over 2 layers: embedding, layer 1, layer 2, head and final norm
        rates = sorted({g["initial_lr"] for g in groups})
        assert rates == pytest.approx([2e-3 * 0.65**k for k in (3, 2, 1, 0)])
        assert state["model.head.weight"].shape == (3, 32)  # MAE fine-tuning's Linear head
        assert hparams["model"]["drop_path_rate"] == 0.1
        # decayed: the patch embedding, 3 matrices per layer, the head; not the class token
        assert decayed == 1 + 3 * 2 + 1


def test_linear_probe_freezes_a_pretrained_mae_encoder(tmp_path):
    pretrained = create_model("mae_crate_micro")
    torch.save({"model": to_released_state_dict(pretrained)}, tmp_path / "mae.pth")
    proc = crate_train(
        *NO_MODEL,
        "task=linear_probe",
        "model=mae_crate_micro",
        f"model.pretrained={tmp_path / 'mae.pth'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(_only_run(tmp_path))
    state = torch.load(summary["checkpoints"]["last"], map_location="cpu", weights_only=True)["state_dict"]
    for name, value in pretrained.state_dict().items():
        assert torch.equal(state[f"model.encoder.{name}"], value), name  # loaded, then left untouched
    assert state["model.head.0.running_mean"].abs().sum() > 0  # the probe's BatchNorm saw features
    assert "model.head.0.weight" not in state  # no affine parameters


def _crash(tmp_path: Path, run: Path, args: list, hook: str, condition: str) -> None:
    """Run crate-train into ``run`` until ``condition`` holds in Lightning hook ``hook``, then
    end the process like a kill: no clean-up, no final checkpoint."""
    (tmp_path / "crash.py").write_text(
        f"import os\nimport lightning as L\n\n\nclass Crash(L.Callback):\n    def {hook}:\n"
        f"        if {condition}:\n            os._exit(3)\n"
    )
    crashed = crate_train(
        *args, f"hydra.run.dir={run}", "+callbacks.crash._target_=crash.Crash",
        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert crashed.returncode == 3, crashed.stderr[-3000:]


def test_resume_continues_to_the_same_result(tmp_path):
    """A run killed at the start of its third epoch and resumed with ckpt_path=last ends with the
    same metrics, and the same metrics.csv, as an uninterrupted run."""
    args = [*QUICK, "trainer.max_epochs=3", "data.train_size=96"]
    full = crate_train(*args, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    resumed = tmp_path / "resumed"
    _crash(
        tmp_path,
        resumed,
        args,
        "on_train_epoch_start(self, trainer, pl_module)",
        "trainer.current_epoch == 2",
    )
    assert not (resumed / "summary.json").exists()
    rows_before = metric_rows(resumed)
    proc = crate_train(*args, f"hydra.run.dir={resumed}", "ckpt_path=last", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = summary_of(tmp_path / "full"), summary_of(resumed)
    assert a["global_step"] == b["global_step"] == 3 * 96 // 16
    for key, value in a["metrics"].items():
        if key not in TIMINGS:
            assert b["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    rows = metric_rows(resumed)
    assert rows[: len(rows_before)] == rows_before  # what the interrupted run logged is kept
    # and the whole log matches the uninterrupted one
    assert _without_timings(rows) == _without_timings(metric_rows(tmp_path / "full"))
    # plain containers only: the checkpoint loads under weights_only
    torch.load(b["checkpoints"]["last"], map_location="cpu", weights_only=True)


def test_resume_from_the_middle_of_an_epoch_continues_with_its_remaining_batches(tmp_path):
    """A checkpoint taken mid-epoch (every_n_train_steps) holds the loader's position: the
    resumed run trains on the rest of that epoch's batches, so its loss curve, step by step, is
    the uninterrupted run's."""
    args = [
        *QUICK,
        "trainer.max_epochs=2",
        "data.train_size=96",
        "+callbacks.last_checkpoint.every_n_train_steps=1",
    ]
    full = crate_train(*args, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    resumed = tmp_path / "resumed"
    # at the third batch of the second epoch
    _crash(tmp_path, resumed, args, "on_train_batch_start(self, trainer, *args)", "trainer.global_step == 8")
    proc = crate_train(*args, f"hydra.run.dir={resumed}", "ckpt_path=last", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ended before the epoch ended" not in proc.stderr  # Lightning sees a resumable loader

    def losses(run: Path) -> list:
        return [(int(r["step"]), float(r["train/loss"])) for r in metric_rows(run) if r["train/loss"]]

    curve, expected = losses(resumed), losses(tmp_path / "full")
    assert [step for step, _ in curve] == [step for step, _ in expected] == list(range(12))
    assert [loss for _, loss in curve] == pytest.approx([loss for _, loss in expected], rel=1e-6)
    assert summary_of(resumed)["metrics"]["val/acc1"] == summary_of(tmp_path / "full")["metrics"]["val/acc1"]


def test_ddp_over_two_processes_matches_one_process(tmp_path):
    """Same global batch: DDP over 2 CPU processes (gloo) logs the same training-loss curve as one
    process, step by step, to 1e-5 (measured: at most 5e-7)."""
    args = [*QUICK, "data.train_size=128", "data.batch_size=32"]
    single = crate_train(*args, f"hydra.run.dir={tmp_path / 'single'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = crate_train(*args, "trainer=ddp_sim", f"hydra.run.dir={tmp_path / 'ddp'}", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert (tmp_path / "ddp" / "train_ddp_process_1.log").is_file()  # a second process ran
    curves = [
        [(int(r["step"]), float(r["train/loss"])) for r in metric_rows(tmp_path / run) if r["train/loss"]]
        for run in ("single", "ddp")
    ]
    assert len(curves[0]) == 2 * 128 // 32 and [s for s, _ in curves[0]] == [s for s, _ in curves[1]]
    for (_, one), (_, two) in zip(*curves, strict=True):
        assert two == pytest.approx(one, abs=1e-5)
    assert summary_of(tmp_path / "ddp")["metrics"]["val/acc1"] == pytest.approx(
        summary_of(tmp_path / "single")["metrics"]["val/acc1"], abs=1e-6
    )


@pytest.mark.parametrize("trainer", ["default", "ddp_sim"])
def test_multirun_sweep_runs_each_job_in_its_own_folder(tmp_path, trainer):
    proc = crate_train("-m", *QUICK, f"trainer={trainer}", "optimizer=lion,adamw", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(tmp_path.glob("outputs/multirun/*/*/[0-9]*"))
    assert [j.name for j in jobs] == ["0", "1"]
    names = []
    for job in jobs:
        summary = summary_of(job)
        assert summary["global_step"] == 2 * 64 // 16 and Path(summary["output_dir"]) == job
        names.append(
            torch.load(summary["checkpoints"]["last"], weights_only=True)["hyper_parameters"]["optimizer"][
                "name"
            ]
        )
        if trainer == "ddp_sim":
            assert (job / "train_ddp_process_1.log").is_file()
    assert names == ["lion", "adamw"]
    assert len(list(tmp_path.glob("outputs/multirun/*/*/*/summary.json"))) == 2  # no nested sweeps


def _wandb_records(path: Path) -> list:
    """The records of an offline ``run-*.wandb`` file: a 7-byte header, then LevelDB-log blocks
    of 32 KiB whose chunks (7-byte header: CRC, length, type) hold protobuf ``Record``s."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            records.append(chunk)
        elif kind in (2, 3):  # first, middle
            pending = chunk if kind == 2 else pending + chunk
        elif kind == 4:  # last
            records.append(pending + chunk)
    return [wandb_internal_pb2.Record.FromString(r) for r in records]


def test_wandb_offline_logs_config_metrics_and_images(tmp_path):
    proc = crate_train(
        *QUICK, "logger=wandb", cwd=tmp_path, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = _only_run(tmp_path)
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    config, logged = {}, set()
    for record in _wandb_records(wandb_file):
        if record.HasField("config"):
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        if record.HasField("history"):
            logged |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    assert config["model"]["name"] == "crate_micro" and config["data"]["train_size"] == 64
    assert config["trainer"]["max_epochs"] == 2 and config["seed"] == 42  # the whole composed config
    assert {"train/loss", "val/acc1", "whitebox/coding_rate_l1"} <= logged
    images = list(wandb_file.parent.glob("files/media/images/whitebox/attention_*.png"))
    assert len(images) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in images)


def test_switches_accumulation_clipping_ema(tmp_path):
    proc = crate_train(
        *QUICK,
        "trainer.accumulate_grad_batches=2",
        "trainer.gradient_clip_val=0.5",
        "ema_decay=0.5",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(_only_run(tmp_path))
    # global batch 16 = 2 accumulated batches of 8: 64 images are 4 optimizer steps per epoch
    assert summary["global_step"] == 2 * 4
    checkpoint = torch.load(summary["checkpoints"]["last"], map_location="cpu", weights_only=True)
    averaged, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    name = "model.blocks.0.ista.dictionary"
    assert not torch.equal(averaged[name], current[name])  # the EMA is what the checkpoint serves


@pytest.mark.parametrize(
    "args,expected",
    [
        (["trainer=ddp_sim", "data.batch_size=15"], "does not divide over 2"),
        (["ckpt_path=last"], "hydra.run.dir=<that run's folder>"),
        (["task=mae"], "task=mae pre-trains a CRATE-MAE model"),
        (["ema_decay=2"], "ema_decay must be null or a number in (0, 1)"),
        pytest.param(
            ["trainer=gpu"],
            "No supported gpu backend",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
    ],
)
def test_impossible_combinations_fail_at_start(tmp_path, args, expected):
    line = one_line_error(crate_train(*QUICK, *args, cwd=tmp_path))
    assert expected in line, line
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))


def test_broken_files_found_while_training_are_one_line_errors(tmp_path, request):
    images, batches = map(request.getfixturevalue, ("imagenet_root", "cifar10_root"))
    bad = add_truncated(images)
    data = ["data.image_size=32", "data.batch_size=1", "data.num_workers=1", "model=crate_micro"]
    line = one_line_error(
        crate_train("data=imagenet", f"data.root={images}", *data, *IMAGENET_FIXTURE, cwd=tmp_path)
    )
    assert str(bad) in line and "data.skip_corrupt=true" in line  # raised in a worker, named here
    with open(batches / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump(["not", "a", "batch"], handle)
    line = one_line_error(crate_train("data=cifar10", f"data.root={batches}", *data, cwd=tmp_path))
    assert "test_batch" in line and "not the dict of a CIFAR python batch" in line


def test_bad_checkpoints_to_resume_from_are_one_line_errors(tmp_path, trained):
    last = trained / "checkpoints" / "last.ckpt"
    line = one_line_error(crate_train(*NO_MODEL, "model=crate_mini", f"ckpt_path={last}", cwd=tmp_path))
    assert "different model" in line and "crate_mini" in line
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[:1000])
    line = one_line_error(crate_train(*QUICK, f"ckpt_path={truncated}", cwd=tmp_path))
    assert "not a readable PyTorch checkpoint" in line


def test_optuna_search_runs_trials_and_reports_the_best(tmp_path):
    proc = crate_train(*QUICK, "hparams_search=optuna", "hydra.sweeper.n_trials=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(tmp_path.glob("outputs/multirun/*/*/[0-9]*/summary.json"))
    assert len(jobs) == 2
    rates = {
        torch.load(summary_of(j.parent)["checkpoints"]["last"], weights_only=True)["hyper_parameters"][
            "optimizer"
        ]["lr"]
        for j in jobs
    }
    assert len(rates) == 2 and all(1e-4 <= r <= 1e-2 for r in rates)  # sampled from the search space
    (results,) = tmp_path.glob("outputs/multirun/*/*/optimization_results.yaml")
    best = max(summary_of(j.parent)["best"]["score"] for j in jobs)
    assert f"best_value: {best}" in results.read_text()  # the trial's return value: val/acc1


def test_slurm_launcher_composes_for_multi_node_ddp(tmp_path):
    proc = crate_train(
        "hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.nodes=4", "--cfg", "hydra", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitit_launcher.SlurmLauncher" in proc.stdout
    assert (
        "nodes: 4" in proc.stdout and "tasks_per_node: 8" in proc.stdout and "gpus_per_node: 8" in proc.stdout
    )


def test_compile_switch_trains_the_same_model_under_the_same_names(tmp_path):
    args = [*QUICK, "trainer.max_epochs=1"]
    runs = {}
    for flag in ("false", "true"):
        proc = crate_train(*args, f"compile={flag}", f"hydra.run.dir={tmp_path / flag}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[flag] = summary_of(tmp_path / flag)
    eager, compiled = (
        torch.load(runs[f]["checkpoints"]["last"], map_location="cpu", weights_only=True)["state_dict"]
        for f in ("false", "true")
    )
    assert eager.keys() == compiled.keys()  # no _orig_mod. prefix: checkpoints stay loadable
    for name in eager:
        assert torch.allclose(eager[name], compiled[name], atol=1e-4), name
    assert runs["true"]["metrics"]["val/loss"] == pytest.approx(
        runs["false"]["metrics"]["val/loss"], abs=1e-4
    )
