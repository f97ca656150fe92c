"""crate-train through its real command line, in subprocesses."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from commands import BIN, QUICK, REPO, crate_train, metric_rows, one_line_error, summary_of  # noqa: F401
from crate_lit.models import create_model, load_pretrained


@pytest.mark.slow
def test_short_run_writes_checkpoint_metrics_and_summary(tmp_path):
    proc = crate_train(*QUICK, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs").glob("*/*/summary.json"))
    assert len(runs) == 1
    summary_path = runs[0]
    assert f"summary:    {summary_path}" in proc.stdout.replace(str(tmp_path), str(tmp_path))
    summary = json.loads(summary_path.read_text())
    run_dir = summary_path.parent
    assert Path(summary["output_dir"]) == run_dir
    assert summary["epochs"] == 2 and summary["global_step"] == 2 * (64 // 16)
    assert 0.0 <= summary["metrics"]["val/acc1"] <= 1.0
    assert summary["wall_time_s"] > 0
    # checkpoints exist and hold the model
    best, last = Path(summary["checkpoints"]["best"]), Path(summary["checkpoints"]["last"])
    assert best.is_file() and last.is_file() and last.name == "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 8
    model = create_model("crate_micro")
    load_pretrained(model, last)  # crate-lit's own Lightning checkpoint loads by path
    # metrics: one row per logged step/epoch with the validation accuracy present
    rows = list(csv.DictReader(open(summary["metrics_file"])))
    assert any(r.get("val/acc1") for r in rows) and any(r.get("train/loss") for r in rows)
    # the white-box monitor logged per-layer measurements and saved an attention figure
    assert any(r.get("whitebox/coding_rate_l2") for r in rows) and any(
        r.get("whitebox/sparsity_l1") for r in rows
    )
    assert len(list((run_dir / "whitebox").glob("attention-epoch*.png"))) == 2
    # the composed config is saved next to them and names the overrides
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert Path(summary["config"]) == run_dir / ".hydra" / "config.yaml"
    assert "name: crate_micro" in config and "train_size: 64" in config


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,expected",
    [
        ("data.image_size=abc", "data.image_size must be an integer"),
        ("optimizer.lr=fast", "optimizer.lr must be a positive number"),
        ("optimizer.name=adamx", "unknown optimizer.name 'adamx'"),
        ("model.global_pool=max", "global_pool must be 'cls' or 'mean'"),
        ("model.name=crate_tinny", "did you mean 'crate_tiny'"),
        ("data.image_size=36", "not divisible by model.patch_size=8"),
        ("data.batch_size=10", None),  # fine on one device: control case
        ("data.num_classes=40", "num_classes"),
        ("model.pretrained=/nonexistent/ckpt.pth", "checkpoint not found"),
        ("model.name=mae_crate_micro", "model.global_pool is no setting of model mae_crate_micro"),
        ("data.shape_scale=[0.9,0.5]", "shape_scale must be [min, max]"),
    ],
)
def test_config_value_typos_give_one_line_errors(tmp_path, override, expected):
    args = [*QUICK, "trainer.max_epochs=1", override]
    proc = crate_train(*args, cwd=tmp_path)
    if expected is None:
        assert proc.returncode == 0, proc.stderr[-2000:]
        return
    assert expected in one_line_error(proc), proc.stderr


def test_unknown_group_option_and_key_are_one_line_with_the_closest_name(tmp_path):
    proc = crate_train("optimizer=adamx", cwd=tmp_path)
    assert "unknown optimizer=adamx; did you mean optimizer=adamw?" in one_line_error(proc)
    proc = crate_train("trainer.max_epoch=1", cwd=tmp_path)
    assert "unknown key trainer.max_epoch " in one_line_error(proc)
    assert "did you mean trainer.max_epochs?" in proc.stderr
    assert not (tmp_path / "outputs").exists()  # stopped before Hydra made a run folder


def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = crate_train("--cfg", "job", "optimizer=lion", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "name: lion" in proc.stdout and "name: crate_mini" in proc.stdout
    assert "img_size: ${data.image_size}" in proc.stdout  # interpolation, not a copied number
    proc = crate_train("--cfg", "job", "experiment=shapes_quick", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "name: crate_micro" in proc.stdout and "max_epochs: 4" in proc.stdout


def _uv() -> list[str] | None:
    """uv where `make install` finds it: on PATH, in the venv, or as `python3 -m uv` (a
    `pip install --user uv` whose script folder is not on PATH); None when it used pip."""
    for found in (shutil.which("uv"), str(BIN / "uv")):
        if found and Path(found).exists():
            return [found]
    python = shutil.which("python3")
    if python and subprocess.run([python, "-m", "uv", "--version"], capture_output=True).returncode == 0:
        return [python, "-m", "uv"]
    return None


@pytest.mark.slow
def test_built_wheel_ships_configs_and_runs_outside_the_repo(tmp_path):
    """Build the wheel, install it without its dependencies into a fresh venv that sees this
    environment's packages through a .pth file, and ask for the config from another folder."""
    uv = _uv()
    if uv is not None:
        builder = [*uv, "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(REPO)]
    else:  # make install's pip path: that venv has pip
        builder = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(REPO)]
    subprocess.run(builder, check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("crate_lit-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next(venv.glob("lib/python*/site-packages"))
    # dependencies from this environment (a .pth does not run the editable hook of the
    # checkout, so crate_lit itself can only come from the wheel)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "PYTHONPATH": "", "PIP_FIND_LINKS": ""}
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import crate_lit; print(crate_lit.__file__)"],
        cwd=outside,
        capture_output=True,
        text=True,
        env=env,
    )
    assert probe.returncode == 0, probe.stderr
    assert str(site) in probe.stdout, "crate_lit must come from the installed wheel, not the checkout"
    proc = subprocess.run(
        [str(venv / "bin" / "crate-train"), "--cfg", "job"],
        cwd=outside,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "name: crate_mini" in proc.stdout and "warmup_epochs" in proc.stdout
    assert not (outside / "outputs").exists()  # --cfg job prints, runs nothing


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "imagenet"])
def test_real_format_datasets_train_through_the_cli(tmp_path, dataset, request):
    """The data configs on small files in the real on-disk formats (fixtures of test_folders)."""
    fixture = {"cifar10": "cifar10_root", "cifar100": "cifar100_root", "imagenet": "imagenet_root"}[dataset]
    root = request.getfixturevalue(fixture)
    proc = crate_train(
        f"data={dataset}",
        f"data.root={root}",
        "model=crate_micro",
        "data.image_size=32",
        "data.batch_size=2",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        *(["data.num_classes=3", "data.eval_resize=36"] if dataset == "imagenet" else []),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(next((tmp_path / "outputs").glob("*/*/summary.json")).read_text())
    assert summary["global_step"] > 0 and 0.0 <= summary["metrics"]["val/acc1"] <= 1.0
