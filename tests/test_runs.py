"""Results that are right and runs that lose nothing, through the real CLI: true top-k accuracy,
the sweep direction of each task, resume semantics (longer schedules, replayed rows, EMA), one
folder per run, atomic files and a full disk, the recipes that need weights, logger=none."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crate_lit.data import ImageNetDataModule
from crate_lit.models import create_model, load_pretrained, to_released_state_dict
from crate_lit.runs import atomic_write, claim_fresh_folder
from test_cli import BIN, QUICK, crate_train, metric_rows, one_line_error, summary_of

MICRO = [arg for arg in QUICK if not arg.startswith("trainer.max_epochs")]
# kills the run like a `kill -9` (no clean-up, no final checkpoint) at CRASH_EPOCH, CRASH_BATCH
CRASH = """import os
import lightning as L


class Crash(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        at = int(os.environ["CRASH_EPOCH"]), int(os.environ["CRASH_BATCH"])
        if (trainer.current_epoch, batch_idx) == at:
            os._exit(3)
"""


def _column(rows: list[dict], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _noise(size: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def imbalanced_root(tmp_path: Path) -> Path:
    """ImageNet layout, 3 classes; the val split holds 10 / 1 / 1 images."""
    root = tmp_path / "imbalanced"
    for split, counts in (("train", (4, 4, 4)), ("val", (10, 1, 1))):
        for label, count in enumerate(counts):
            folder = root / split / f"n0000000{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                _noise(36, 100 * label + i + (0 if split == "train" else 50)).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_accuracy_is_top1_over_all_images_not_the_mean_of_class_recalls(tmp_path, imbalanced_root):
    data = [f"data.root={imbalanced_root}", "data.num_classes=3", "data.eval_resize=36", "data.num_workers=0"]
    proc = crate_train(
        "data=imagenet", *data, "model=crate_micro", "data.image_size=32", "data.batch_size=4",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(tmp_path / "run")
    model = create_model("crate_micro", num_classes=3, img_size=32)
    load_pretrained(model, summary["checkpoints"]["last"])
    module = ImageNetDataModule(
        str(imbalanced_root), image_size=32, num_classes=3, eval_resize=36, num_workers=0
    )
    module.setup("validate")
    model.eval()
    with torch.no_grad():
        pairs = [(model(module.eval_batch(x)).argmax(1), y) for x, y in module.val_dataloader()]
    predicted, labels = torch.cat([p for p, _ in pairs]), torch.cat([y for _, y in pairs])
    top1 = (predicted == labels).float().mean().item()
    class_mean = torch.stack([(predicted[labels == c] == c).float().mean() for c in range(3)]).mean().item()
    assert len(labels) == 12 and abs(top1 - class_mean) > 0.05  # the two averages tell apart here
    assert summary["metrics"]["val/acc1"] == pytest.approx(top1, abs=1e-6)
    assert summary["best"]["score"] == pytest.approx(top1, abs=1e-6)
    assert summary["metrics"]["val/acc5"] == 1.0  # top-5 of 3 classes: always right


@pytest.mark.slow
def test_optuna_follows_the_task_direction_for_mae(tmp_path):
    mae = [arg if not arg.startswith("model=") else "model=mae_crate_micro" for arg in MICRO]
    proc = crate_train(
        *mae, "task=mae", "trainer.max_epochs=1", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = tmp_path.glob("outputs/multirun/*/*/*/summary.json")
    scores = [summary_of(p.parent)["best"]["score"] for p in jobs]
    assert len(scores) == 2 and scores[0] != scores[1]
    (results,) = tmp_path.glob("outputs/multirun/*/*/optimization_results.yaml")
    assert f"best_value: {min(scores)}" in results.read_text()  # val/loss: the lower is the better


@pytest.mark.slow
def test_resume_with_more_epochs_stretches_the_schedule_and_replayed_rows_are_not_kept(tmp_path):
    """A 2-epoch run, resumed to 3 epochs, killed in the middle of its third epoch and resumed
    again: the added steps follow the 3-epoch schedule (not its floor), and metrics.csv holds
    every step once, as many rows as an uninterrupted 3-epoch run."""
    args = [*MICRO, "data.train_size=96"]  # 6 steps an epoch
    full = crate_train(*args, "trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    run = tmp_path / "run"
    short = crate_train(*args, "trainer.max_epochs=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert short.returncode == 0, short.stderr[-3000:]
    (tmp_path / "crash.py").write_text(CRASH)
    crashed = crate_train(
        *args, "trainer.max_epochs=3", f"hydra.run.dir={run}", "ckpt_path=last",
        "+callbacks.crash._target_=crash.Crash", cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "CRASH_EPOCH": "2", "CRASH_BATCH": "4"},
    )  # fmt: skip
    assert crashed.returncode == 3
    assert max(int(r["step"]) for r in metric_rows(run)) == 15  # steps 12..15 were logged, then the kill
    resumed = crate_train(
        *args, "trainer.max_epochs=3", f"hydra.run.dir={run}", "ckpt_path=last", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "the learning rate follows the new schedule" in resumed.stdout + resumed.stderr

    # each resume kept the config it resumed from: max_epochs 2 (the first run), then 3
    kept = [(run / ".hydra" / f"before-resume-{k}" / "config.yaml").read_text() for k in (1, 2)]
    assert "max_epochs: 2" in kept[0] and "max_epochs: 3" in kept[1]
    assert "max_epochs: 3" in (run / ".hydra" / "config.yaml").read_text()

    rows, reference = metric_rows(run), metric_rows(tmp_path / "full")
    assert summary_of(run)["global_step"] == 18 and len(rows) == len(reference)
    for key in ("train/loss", "lr-AdamW/pg1", "val/loss", "train/acc1", "whitebox/coding_rate_l1"):
        steps = [int(r["step"]) for r in rows if r.get(key)]
        assert steps == [int(r["step"]) for r in reference if r.get(key)], key  # each step once
    lr, lr_full = _column(rows, "lr-AdamW/pg1"), _column(reference, "lr-AdamW/pg1")
    for step in range(12, 18):
        assert lr[step] == pytest.approx(lr_full[step], rel=1e-6), step
    floor = 0.01 * max(lr.values())  # scheduler min_lr_ratio: where the 2-epoch schedule ends
    assert lr[12] > 10 * floor


@pytest.mark.slow
def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    """The timestamped folders of the next seconds are taken (as by runs started a moment ago):
    this run claims `<time>_1` and leaves theirs as they were."""
    now = datetime.now()
    taken = [tmp_path / "outputs" / f"{now + timedelta(seconds=s):%Y-%m-%d/%H-%M-%S}" for s in range(-1, 30)]
    for folder in taken:
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml").write_text("seed: 0\n")
    proc = crate_train(*MICRO, "trainer.max_epochs=1", "seed=7", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = tmp_path.glob("outputs/*/*/summary.json")
    run_dir = summary.parent
    assert run_dir.name.endswith("_1") and run_dir.with_name(run_dir.name[:-2]) in taken
    assert "seed: 7" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert all((f / ".hydra" / "config.yaml").read_text() == "seed: 0\n" for f in taken)


def test_claim_fresh_folder_is_exclusive(tmp_path):
    base = tmp_path / "12-00-00"
    claimed = [claim_fresh_folder(base) for _ in range(3)]
    assert [p.name for p in claimed] == ["12-00-00", "12-00-00_1", "12-00-00_2"]


@pytest.mark.slow
def test_a_finished_run_folder_is_not_reused_without_resuming(tmp_path):
    run = tmp_path / "run"
    first = crate_train(*MICRO, "trainer.max_epochs=1", f"hydra.run.dir={run}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _digest(run)
    line = one_line_error(crate_train(*MICRO, "seed=3", f"hydra.run.dir={run}", cwd=tmp_path))
    assert "already holds a run" in line and "ckpt_path=last" in line
    assert _digest(run) == before  # config, checkpoints, metrics, summary, logs: untouched


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "figure.png"
    path.write_bytes(b"old")

    def half_then_fail(handle):
        handle.write(b"new, half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["figure.png"]
    atomic_write(path, lambda handle: handle.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["figure.png"]


FILL_DISK = """import os
import shutil
import lightning as L


class FillDisk(L.Callback):
    # at the start of epoch 1 the disk fills up but for a few kB: room for log rows, not a checkpoint
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            folder = os.environ["DISK"]
            free = shutil.disk_usage(folder).free
            with open(os.path.join(folder, "filler"), "wb") as handle:
                handle.write(bytes(free - 64 * 1024))
"""


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and mount (root) for a small tmpfs")
def test_a_full_disk_stops_the_run_with_one_line_and_the_last_checkpoint_intact(tmp_path):
    """The run folder on a 4 MiB tmpfs (in a mount namespace of its own) that fills up in epoch 1;
    what the run left there is copied out before the namespace, and the tmpfs, go."""
    disk, left = tmp_path / "disk", tmp_path / "left"
    disk.mkdir()
    (tmp_path / "fill.py").write_text(FILL_DISK)
    command = [
        str(BIN / "crate-train"), *MICRO, "trainer.max_epochs=3", f"hydra.run.dir={disk / 'run'}",
        "~callbacks.whitebox_monitor", "+callbacks.fill._target_=fill.FillDisk",
    ]  # fmt: skip
    copy_out = f'rc=$?; cp -a "{disk}/run" "{left}"; exit $rc'
    script = f'mount -t tmpfs -o size=4m tmpfs "{disk}" && {{ "$@"; {copy_out}; }}'
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *command],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "DISK": str(disk)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = one_line_error(proc)
    assert "no space left on the device while writing" in line and ".ckpt" in line
    assert f"ckpt_path=last hydra.run.dir={disk / 'run'}" in line
    names = sorted(p.name for p in (left / "checkpoints").iterdir())
    assert "last.ckpt" in names and all(n.endswith(".ckpt") for n in names), names  # no partial files
    for name in names:  # every checkpoint there is whole: epoch 0's
        checkpoint = torch.load(left / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 4, name
    assert not list(disk.iterdir())  # nothing was written outside the namespace's tmpfs


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,expected",
    [
        (["experiment=linear_probe"], "task=linear_probe trains a head on a frozen pre-trained backbone"),
        (["experiment=cifar_finetune"], "require_pretrained=false to train from scratch"),
    ],
)
def test_recipes_that_need_weights_refuse_to_start_without_them(tmp_path, args, expected):
    line = one_line_error(crate_train(*args, cwd=tmp_path))
    assert expected in line, line
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))


@pytest.mark.slow
def test_resuming_needs_what_the_checkpoint_was_trained_with(tmp_path):
    run = tmp_path / "run"
    ema = crate_train(*MICRO, "trainer.max_epochs=1", "ema_decay=0.5", f"hydra.run.dir={run}", cwd=tmp_path)
    assert ema.returncode == 0, ema.stderr[-3000:]
    more = [*MICRO, "trainer.max_epochs=2", f"hydra.run.dir={run}", "ckpt_path=last"]
    line = one_line_error(crate_train(*more, cwd=tmp_path))
    assert "trained with an EMA of the weights" in line and "ema_decay=0.5" in line
    proc = crate_train(*more, "ema_decay=0.5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary_of(run)["global_step"] == 8
    released = tmp_path / "CRATE_micro.pth"
    torch.save(to_released_state_dict(create_model("crate_micro")), released)
    line = one_line_error(crate_train(*MICRO, f"ckpt_path={released}", cwd=tmp_path))
    assert "holds model weights" in line and "model.pretrained=" in line


@pytest.mark.slow
def test_validate_best_is_no_further_epoch_and_logger_none_runs(tmp_path):
    proc = crate_train(*QUICK, "validate_best=true", f"hydra.run.dir={tmp_path / 'best'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, rows = summary_of(tmp_path / "best"), metric_rows(tmp_path / "best")
    assert max(int(r["epoch"]) for r in rows if r.get("epoch")) == 1  # epochs 0 and 1 only
    assert summary["best_validation"]["val/acc1"] == pytest.approx(summary["best"]["score"], abs=1e-6)
    (again,) = [r for r in rows if r.get("best/val/acc1")]
    assert float(again["best/val/acc1"]) == pytest.approx(summary["best"]["score"], abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "best" / "whitebox").iterdir()) == [
        "attention-epoch000.png",
        "attention-epoch001.png",
    ]

    proc = crate_train(*QUICK, "logger=none", f"hydra.run.dir={tmp_path / 'quiet'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(tmp_path / "quiet")
    assert summary["metrics_file"] is None and summary["global_step"] == 8
    assert Path(summary["checkpoints"]["last"]).is_file()
    assert not (tmp_path / "quiet" / "metrics.csv").exists()
