"""Results that are right and runs that lose nothing, through the real CLI: true top-k accuracy,
the sweep direction of each task, resume semantics (longer schedules, replayed rows, EMA), one
folder per run, atomic files and a full disk, the recipes that need weights, logger=none."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import time
import zipfile
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from PIL import Image

from commands import BIN, QUICK, crate_train, metric_rows, one_line_error, summary_of
from crate_lit.data import ImageNetDataModule
from crate_lit.loggers import AppendingCSVLogger
from crate_lit.models import CheckpointMismatchError, create_model, load_pretrained, to_released_state_dict
from crate_lit.models.factory import matching_models
from crate_lit.runs import atomic_write, claim_fresh_folder, pasteable

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


# ---------------------------------------------------------------------------------------------
# issue #12: one line instead of a traceback or an unhelpful word; Ctrl-C and kill; paths that
# paste back; metrics.csv in natural order

# sends a real signal to the run itself at SIGNAL_EPOCH, SIGNAL_BATCH (when SIGNAL is set)
SIGNAL = """import os
import signal
import lightning as L


class Signal(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "SIGNAL" not in os.environ:
            return
        at = int(os.environ["SIGNAL_EPOCH"]), int(os.environ["SIGNAL_BATCH"])
        if (trainer.current_epoch, batch_idx) == at:
            os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
"""


def _flip_member(source: Path, target: Path, member: str) -> None:
    """A copy of the zip archive ``source`` with every 7th byte of ``member`` inverted: still a
    valid zip (its directory and headers untouched; torch checks no CRC), damaged inside."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member))
    assert info.compress_type == zipfile.ZIP_STORED
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    for k in range(0, info.file_size, 7):
        data[start + k] ^= 0xFF
    target.write_bytes(bytes(data))
    assert zipfile.is_zipfile(target)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["text", "random", "flipped-pretrained", "flipped-resume", "legacy-resume", "other-size", "other-model"],
)
def test_files_that_are_no_checkpoint_for_this_run_are_named_in_one_line(tmp_path, trained, case):
    """Each was a traceback or a line that did not help: `error: 101` for a text file, advice to
    unpickle a random file with weights_only=False, a UnicodeDecodeError, 'truncated or corrupt'
    for the legacy format of older released weights, strict=False (which the CLI cannot pass)
    for weights of another size, a resume that did not say which model the checkpoint holds."""
    last = trained / "checkpoints" / "last.ckpt"
    file = tmp_path / "file"
    if case == "text":
        file.write_text("this is not a checkpoint\n")
        args, expected = [f"model.pretrained={file}"], ["is not a PyTorch checkpoint"]
    elif case == "random":
        file.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        args, expected = [f"model.pretrained={file}"], ["is not a PyTorch checkpoint"]
    elif case.startswith("flipped"):
        _flip_member(last, file, "data.pkl")
        key = "model.pretrained" if case == "flipped-pretrained" else "ckpt_path"
        args, expected = [f"{key}={file}"], ["damaged"]
    elif case == "legacy-resume":  # released weights in torch.save's format before PyTorch 1.6
        weights = to_released_state_dict(create_model("crate_micro"))
        torch.save(weights, file, _use_new_zipfile_serialization=False)
        args, expected = [f"ckpt_path={file}"], ["holds model weights", "model.pretrained="]
    elif case == "other-size":  # released weights of crate_mini (width 192, depth 4) for crate_micro
        torch.save(to_released_state_dict(create_model("crate_mini")), file)
        args, expected = [f"model.pretrained={file}"], ["width 192, depth 4", "model=crate_mini"]
    else:  # resume a crate_micro checkpoint as crate_mini
        args = ["model=crate_mini", f"ckpt_path={last}"]
        expected = ["different model, model=crate_micro, than this run's model=crate_mini"]
    line = one_line_error(crate_train(*MICRO, "trainer.max_epochs=1", *args, cwd=tmp_path))
    assert all(e in line for e in expected), line
    assert "weights_only=False" not in line and "strict=False" not in line, line
    assert not (tmp_path / "outputs").exists()  # the failed start left no empty folder behind


def test_load_pretrained_names_the_model_of_the_checkpoints_shapes():
    """CRATE-S weights (width 576, depth 12) given to CRATE-T: the size table names crate_small;
    strict=False, which skips only missing and unexpected keys, is not offered for shapes."""
    small = to_released_state_dict(create_model("crate_small", num_classes=10))
    with pytest.raises(CheckpointMismatchError) as raised:
        load_pretrained(create_model("crate_tiny", num_classes=10), small)
    message = str(raised.value)
    assert "width 576, depth 12" in message and "model=crate_small" in message
    assert "strict=False" not in message
    assert matching_models(create_model("crate_base_patch8").state_dict()) == ["crate_base_patch8"]
    assert matching_models(create_model("mae_crate_mini").state_dict()) == ["mae_crate_mini"]


@pytest.mark.slow
def test_wandb_without_login_or_offline_mode_is_one_line(tmp_path):
    """No API key anywhere wandb looks (HOME, its config folder, the environment) and no offline
    mode: wandb refuses before any network access; the line names both ways out."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"))
    env.update(WANDB_DATA_DIR=str(home / "data"), WANDB_DIR=str(home / "dir"), NETRC=str(home / ".netrc"))
    proc = subprocess.run(
        [str(BIN / "crate-train"), *MICRO, "trainer.max_epochs=1", "logger=wandb"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = one_line_error(proc)
    assert "WANDB_MODE=offline" in line and "wandb login" in line, line
    assert not (tmp_path / "outputs").exists()  # the failed start left no empty folder behind


def _read_only_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """crate-train with CRATE_LIT_OUTPUTS in a read-only folder: a read-only tmpfs in a mount
    namespace of its own for root (whom permissions do not stop), a folder without write
    permission for anyone else."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    command = [str(BIN / "crate-train"), *args]
    env = {**os.environ, "CRATE_LIT_OUTPUTS": str(folder / "outputs")}
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        finally:
            folder.chmod(0o755)
    if not _can_mount_tmpfs():
        pytest.skip("root without unshare/mount: no way to make a folder read-only")
    script = f'mount -t tmpfs -o ro,size=1m tmpfs "{folder}" && exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *command],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_outputs_that_cannot_hold_a_run_folder_are_one_line(tmp_path):
    line = one_line_error(_read_only_run(tmp_path, *MICRO, "trainer.max_epochs=1"))
    assert "cannot create the run folder" in line and "CRATE_LIT_OUTPUTS=<a writable folder>" in line, line
    a_file = tmp_path / "outputs-file"
    a_file.write_text("a file, not a folder\n")
    proc = crate_train(*MICRO, "trainer.max_epochs=1", cwd=tmp_path, env={"CRATE_LIT_OUTPUTS": str(a_file)})
    line = one_line_error(proc)
    assert "cannot create the run folder" in line and "Not a directory" in line, line
    assert a_file.read_text() == "a file, not a folder\n"


@pytest.mark.slow
def test_cifar_download_without_network_is_one_line(tmp_path):
    """No network for real and the same on every machine: urllib's proxy is a closed local port."""
    closed = "http://127.0.0.1:9"
    env = {"http_proxy": closed, "https_proxy": closed, "HTTP_PROXY": closed, "HTTPS_PROXY": closed}
    env.update(no_proxy="", NO_PROXY="")
    args = ["data=cifar10", f"data.root={tmp_path / 'cifar'}", "data.download=true", "model=crate_micro"]
    args += ["data.image_size=32", "data.num_workers=0", "trainer.max_epochs=1"]
    started = time.time()
    line = one_line_error(crate_train(*args, cwd=tmp_path, env=env))
    assert "data.download=true could not download data=cifar10" in line and "data.root=" in line, line
    assert time.time() - started < 300
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_slurm_launcher_off_a_cluster_is_one_line(tmp_path):
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not Path(p, "srun").exists())
    proc = crate_train("-m", "hydra/launcher=slurm", *MICRO, "seed=1,2", cwd=tmp_path, env={"PATH": path})
    line = one_line_error(proc)
    assert "hydra/launcher=slurm" in line and "no SLURM" in line, line
    assert not (tmp_path / "outputs").exists()  # refused before the sweep claimed a folder


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="trainer=ddp runs where there is a GPU")
def test_ddp_on_a_machine_without_gpu_points_to_ddp_sim(tmp_path):
    line = one_line_error(crate_train(*MICRO, "trainer.max_epochs=1", "trainer=ddp", cwd=tmp_path))
    assert "trainer=ddp needs a GPU" in line and "trainer=ddp_sim" in line, line


@pytest.mark.slow
def test_a_failed_resume_keeps_the_folder_and_logs_the_error(tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    kept = {k: v for k, v in _digest(run).items() if not k.startswith((".hydra", "train.log"))}
    proc = crate_train(*MICRO, "model=crate_mini", "ckpt_path=last", f"hydra.run.dir={run}", cwd=tmp_path)
    line = one_line_error(proc)
    assert {k: v for k, v in _digest(run).items() if k in kept} == kept  # checkpoints, metrics, summary
    assert (run / "train.log").read_text().splitlines()[-1].endswith(line)


@pytest.mark.slow
def test_ctrl_c_writes_a_summary_and_the_printed_command_resumes_in_a_path_with_spaces(tmp_path):
    """SIGINT in epoch 1 of 3 (4 steps an epoch) in an outputs folder named with a space and a
    non-ASCII letter: exit 130, summary.json 'interrupted' at step 6, and one line whose command,
    pasted into a shell, resumes the run; its report counts the time of both parts, and its
    checkpoint path pastes back through the shell into Hydra's lexer."""
    (tmp_path / "signal_at.py").write_text(SIGNAL)
    outputs = tmp_path / "runs ü"
    args = [*MICRO, "trainer.max_epochs=3", "+callbacks.signal._target_=signal_at.Signal"]
    python_path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": python_path, "CRATE_LIT_OUTPUTS": str(outputs)}
    at = {"SIGNAL": "SIGINT", "SIGNAL_EPOCH": "1", "SIGNAL_BATCH": "2"}
    proc = crate_train(*args, cwd=tmp_path, env={**env, **at})
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (summary_path,) = outputs.glob("*/*/summary.json")
    run = summary_path.parent
    summary = summary_of(run)
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT"
    assert summary["global_step"] == 6 and summary["epochs"] == 1
    line = proc.stderr.splitlines()[-1]
    assert line.startswith("crate-train: interrupted (SIGINT)") and str(run) in line
    command = line.split("resume it with: ", 1)[1]
    assert command.startswith("crate-train ")
    assert command.endswith(f"ckpt_path=last hydra.run.dir=\"'{run}'\"")  # quoted for the shell and Hydra

    resumed = subprocess.run(
        ["bash", "-c", f"{BIN}/{command}"], cwd=tmp_path, env={**os.environ, **env},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = summary_of(run)
    assert summary["status"] == "finished" and summary["global_step"] == 12
    assert summary["resumed_from"]["global_step"] == 4  # last.ckpt of epoch 0
    assert summary["total_wall_time_s"] > summary["wall_time_s"] > 0
    report = resumed.stdout.splitlines()
    took = next(r for r in report if " after 3 epochs " in r)
    total, part = summary["total_wall_time_s"], summary["wall_time_s"]
    assert f"in {total:.1f} s, {part:.1f} s of them in this run" in took

    # the report's checkpoint path, pasted after ckpt_path= into a shell, reaches Hydra whole
    printed = next(r for r in report if r.startswith("checkpoint: ")).split(": ", 1)[1]
    argv = subprocess.run(
        ["bash", "-c", f"printf '%s' ckpt_path={printed}"], capture_output=True, text=True, check=True
    ).stdout
    override = OverridesParser.create().parse_override(argv)
    assert override.value() == summary["checkpoints"]["best"] and Path(override.value()).is_file()


@pytest.mark.slow
def test_kill_stops_training_with_a_summary(tmp_path):
    """A real `kill` (SIGTERM) from outside once the first checkpoint is written: the run stops
    within the epoch it is in (Lightning alone finished the batch and exited 0 without a summary)."""
    run = tmp_path / "run"
    command = [str(BIN / "crate-train"), *MICRO, "trainer.max_epochs=200", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run / "checkpoints" / "last.ckpt").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    summary = summary_of(run)
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    assert 4 <= summary["global_step"] < 200 * 4
    assert stderr.splitlines()[-1].startswith("crate-train: interrupted (SIGTERM)")


@pytest.mark.slow
def test_metrics_columns_in_natural_order_and_lightnings_notices_silenced(tmp_path):
    """11 layers log whitebox/*_l1 ... _l11: natural order, not l1, l10, l11, l2. The litlogger
    advert and the LeafSpec deprecation are gone; other warnings are not (the logging interval
    longer than an epoch, at the default log_every_n_steps)."""
    args = [a for a in MICRO if not a.startswith("trainer.log_every_n_steps")]
    run = tmp_path / "run"
    proc = crate_train(*args, "trainer.max_epochs=1", "model.depth=11", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    layers = [h.rsplit("_l", 1)[1] for h in header if h.startswith("whitebox/sparsity_l")]
    assert layers == [str(i) for i in range(1, 12)], header
    output = proc.stdout + proc.stderr
    assert "litlogger" not in output and "LeafSpec" not in output
    assert "smaller than the logging interval" in output


def test_a_resumed_string_sorted_metrics_file_is_rewritten_in_natural_order(tmp_path):
    """metrics.csv of an earlier run (columns sorted as strings) that a resumed run appends to:
    the file is rewritten under the natural order once, and every row keeps its values."""
    old = ["epoch", "step", "whitebox/sparsity_l1", "whitebox/sparsity_l10", "whitebox/sparsity_l2"]
    (tmp_path / "metrics.csv").write_text(",".join(old) + "\n0,3,0.1,0.10,0.2\n")
    logger = AppendingCSVLogger(save_dir=str(tmp_path), name="", version="")
    logger.log_metrics(
        {"whitebox/sparsity_l1": 0.5, "whitebox/sparsity_l2": 0.6, "whitebox/sparsity_l10": 1}, step=4
    )
    logger.save()
    rows = list(csv.reader((tmp_path / "metrics.csv").open(newline="")))
    assert rows[0] == ["epoch", "step", *(f"whitebox/sparsity_l{i}" for i in (1, 2, 10))]
    assert rows[1:] == [["0", "3", "0.1", "0.2", "0.10"], ["", "4", "0.5", "0.6", "1"]]


def test_pasteable_paths_survive_the_shell_and_hydras_lexer(tmp_path):
    parser = OverridesParser.create()
    for path in ("/plain/2026-12-02/05-02-22/last.ckpt", "/a b/ü/x.ckpt", "/it's/a,b=c/x", '/q"$HOME`!/x'):
        printed = pasteable(path)
        argv = subprocess.run(
            ["bash", "-c", f"printf '%s' ckpt_path={printed}"], capture_output=True, text=True, check=True
        ).stdout
        assert parser.parse_override(argv).value() == path, (path, printed)
    assert pasteable("/plain/2026-12-02/05-02-22/last.ckpt") == "/plain/2026-12-02/05-02-22/last.ckpt"


def test_a_resume_with_data_settings_that_resize_the_weights_is_refused_before_anything_is_written(  # noqa: E501
    tmp_path, trained
):
    """data.image_size sizes the position table, data.num_classes the head: neither is in the
    model config, yet the checkpoint cannot be loaded; refused at start, the run's files as they were."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    kept = {name: (run / name).read_bytes() for name in ("hparams.yaml", "metrics.csv")}
    for change, key in (("data.image_size=48", "pos_embed"), ("data.num_classes=4", "head")):
        args = [*MICRO, "trainer.max_epochs=2", change, f"hydra.run.dir={run}", "ckpt_path=last"]
        line = one_line_error(crate_train(*args, cwd=tmp_path))
        assert "does not fit this run's model" in line and key in line, line
        assert {name: (run / name).read_bytes() for name in kept} == kept


# ---------------------------------------------------------------------------------------------
# issue #13: one reader (models.factory.read_torch_file) for model.pretrained, ckpt_path to
# resume from and crate-analyze's ckpt_path; each names the file the way its caller was given it


def test_one_reader_names_each_bad_file_by_its_key(tmp_path):
    import argparse

    from crate_lit.runs import read_checkpoint

    weights = create_model("crate_micro").state_dict()
    good = tmp_path / "good.pth"
    torch.save(weights, good)
    legacy = tmp_path / "legacy.pth"
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint\n")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:1000])
    objects = tmp_path / "objects.pth"
    torch.save({"state_dict": weights, "args": argparse.Namespace(lr=1)}, objects)
    flipped = tmp_path / "flipped.pth"
    _flip_member(good, flipped, "data.pkl")

    def error(read, path) -> str:
        with pytest.raises(ValueError) as raised:
            read(path)
        message = str(raised.value)
        assert "\n" not in message and "weights_only=True" not in message, message
        return message

    def analyze(path):
        return read_checkpoint(path, resuming=False)

    for read in (read_checkpoint, analyze):
        assert set(read(good)) == set(weights) and set(read(legacy)) == set(weights)
        assert error(read, text).startswith(f"ckpt_path={text} is not a PyTorch checkpoint")
        for damaged in (cut, flipped):
            line = error(read, damaged)
            assert line.startswith(f"ckpt_path={damaged} cannot be read as a checkpoint"), line
            assert "damaged" in line and "not a readable PyTorch checkpoint" in line
    assert "args" in read_checkpoint(objects)  # resumed as Lightning would read it
    line = error(analyze, objects)
    assert "holds objects other than tensors and plain containers" in line and "argparse.Namespace" in line
    assert "weights_only=False" not in line

    model = create_model("crate_micro")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_pretrained(model, tmp_path / "missing.pth")
    assert error(lambda p: load_pretrained(model, p), text).startswith(f"{text} is not a PyTorch checkpoint")
    assert "damaged" in error(lambda p: load_pretrained(model, p), flipped)
    line = error(lambda p: load_pretrained(model, p), objects)
    assert "argparse.Namespace" in line and "torch.load(path, weights_only=False)" in line
