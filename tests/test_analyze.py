"""crate-analyze through its real command line on a freshly trained tiny model."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from commands import one_line_error, run_command
from crate_lit.models import create_model, to_released_state_dict

BIN = Path(sys.executable).parent
# a k-NN analysis small enough for a test: 64 training images as the memory, 32 queries
KNN = (
    "task=knn",
    "num_images=32",
    "num_train_images=64",
    "batch_size=16",
    "data.train_size=128",
    "data.val_size=32",
)


def run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_command(tool, *args, cwd=cwd)


def _check_report(out: Path, depth: int) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert len(report["layerwise"]) == depth
    for layer in report["layerwise"]:
        assert all(math.isfinite(v) for v in layer.values())
        assert 0.0 <= layer["sparsity_mean"] <= 1.0 and layer["coding_rate_mean"] > 0
    seg = report["segmentation"]
    assert all(
        0.0 <= seg[k] <= 1.0 for k in ("best_head_iou", "union_iou", "all_foreground_iou", "centre_box_iou")
    )
    for name in report["figures"].values():
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    return report


@pytest.mark.slow
def test_analysis_of_a_trained_model_and_a_released_file(tmp_path):
    train = run(
        "crate-train",
        "model=crate_micro",
        "data.image_size=32",
        "data.shape_scale=[0.5,0.9]",
        "data.train_size=64",
        "data.val_size=32",
        "data.batch_size=16",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "analysis"
    proc = run(
        "crate-analyze",
        f"ckpt_path={ckpt}",
        "num_images=32",
        "num_figure_images=3",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = _check_report(out, depth=2)
    assert report["num_images"] == 32
    # the run's data settings, not data/shapes.yaml's defaults (other image size and scale),
    # except what the command line gives (val_size is the run's: 32 images)
    assert report["data"]["image_size"] == 32 and report["data"]["shape_scale"] == [0.5, 0.9]
    assert report["data"]["val_size"] == 32
    with Image.open(out / "attention.png") as image:  # 3 images x 2 rows, image + 2 heads
        assert image.size[0] < image.size[1]
    seg = report["segmentation"]
    assert seg["upsample"] == "bilinear" and seg["keep"] == 0.6
    assert [row["layer"] for row in seg["by_layer"]] == [1, 2]
    assert seg["by_layer"][-1]["union_iou"] == pytest.approx(seg["union_iou"])

    # k-NN and linear probe on the classifier's features
    proc = run("crate-analyze", f"ckpt_path={ckpt}", *KNN, f"hydra.run.dir={tmp_path / 'knn'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_knn(tmp_path / "knn", "crate_micro", "Crate")

    # a released-layout file (module. prefix, under state_dict) with model= named
    released = {
        "state_dict": {
            "module." + k: v for k, v in to_released_state_dict(create_model("crate_micro")).items()
        }
    }
    torch.save(released, tmp_path / "released.pth")
    proc = run(
        "crate-analyze",
        f"ckpt_path={tmp_path / 'released.pth'}",
        "model=crate_micro",
        "num_images=16",
        f"hydra.run.dir={tmp_path / 'released_analysis'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_report(tmp_path / "released_analysis", depth=2)
    # without model= the released file cannot name its model: one clear line
    proc = run("crate-analyze", f"ckpt_path={tmp_path / 'released.pth'}", cwd=tmp_path)
    assert proc.returncode == 2 and "add model=NAME" in proc.stderr and "Traceback" not in proc.stderr


def _check_knn(out: Path, model: str, model_class: str) -> None:
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "knn" and report["model"] == model and report["model_class"] == model_class
    assert report["num_train_images"] == 64 and report["num_images"] == 32
    assert 0.0 <= report["knn"]["top1"] <= 1.0 and 0.0 <= report["linear_probe"]["top1"] <= 1.0


def _train_then_knn(tmp_path: Path, name: str, args: list, model: str, model_class: str) -> Path:
    """Train a tiny run with ``args``, then ``crate-analyze task=knn`` on its last checkpoint."""
    small = ["data.image_size=32", "data.train_size=96", "data.val_size=32", "data.batch_size=16"]
    small.append("trainer.max_epochs=1")
    train = run(
        "crate-train", *args, *small, "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / name}", cwd=tmp_path,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-2000:]
    ckpt = tmp_path / name / "checkpoints" / "last.ckpt"
    out = tmp_path / f"{name}_knn"
    proc = run("crate-analyze", f"ckpt_path={ckpt}", *KNN, f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_knn(out, model, model_class)
    return ckpt


@pytest.mark.slow
def test_knn_of_a_crate_mae_encoder_and_of_its_linear_probe(tmp_path):
    # a CRATE-MAE pre-training checkpoint: features are the encoder's class token
    mae_ckpt = _train_then_knn(
        tmp_path, "mae", ["task=mae", "model=mae_crate_micro"], "mae_crate_micro", "CrateMAE"
    )
    # the encoder with a linear-probe head: a classification checkpoint of a CRATE-MAE model
    probe = ["task=linear_probe", "model=mae_crate_micro", f"model.pretrained={mae_ckpt}"]
    _train_then_knn(tmp_path, "probe", probe, "mae_crate_micro", "CrateMAEClassifier")

    # a released-layout CRATE-MAE file, with model= named
    torch.save(create_model("mae_crate_micro").state_dict(), tmp_path / "mae.pth")
    out = tmp_path / "released_knn"
    mae_file = [f"ckpt_path={tmp_path / 'mae.pth'}", "model=mae_crate_micro"]
    proc = run("crate-analyze", *mae_file, *KNN, f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_knn(out, "mae_crate_micro", "CrateMAE")

    # its white-box figures: the decoder's output is not called a reconstruction (the training
    # grid, which pastes the visible patches back, is)
    out = tmp_path / "released_whitebox"
    few = ["num_images=8", "num_figure_images=2", "data.val_size=8", "data.train_size=8"]
    proc = run("crate-analyze", *mae_file, *few, f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = _check_report(out, depth=2)
    assert report["model"] == "mae_crate_micro"
    assert (
        report["figures"]["decoder_output"] == "decoder_output.png"
        and "reconstructions" not in report["figures"]
    )
    assert not (out / "reconstructions.png").exists()


def test_a_checkpoint_brings_its_data_settings():
    """A shapes run's checkpoint sets the analysed images; a setting the checkpoint predates
    takes the data module's default (what its run used), the loader settings stay."""
    from omegaconf import OmegaConf

    from crate_lit.analysis import inherit_data_settings
    from crate_lit.runs import config_dir

    cfg = OmegaConf.create({"data": OmegaConf.load(Path(config_dir()) / "data" / "shapes.yaml")})
    cfg2 = cfg.copy()
    assert cfg.data.image_size == 48 and list(cfg.data.shape_scale) == [0.4, 0.7]
    old = {"datamodule_hyper_parameters": {"image_size": 32, "num_classes": 4, "batch_size": 8}}
    taken = inherit_data_settings(cfg, old)
    assert cfg.data.image_size == 32 and cfg.data.num_classes == 4
    assert list(cfg.data.shape_scale) == [0.5, 0.9]  # ShapesDataModule's default
    assert cfg.data.batch_size == 64 and "batch_size" not in taken
    # another data module's settings (an ImageNet run) leave data=shapes alone
    imagenet_run = {"datamodule_hyper_parameters": {"root": "/x", "image_size": 224}}
    assert inherit_data_settings(cfg2, imagenet_run) == []
    assert cfg2.data.image_size == 48


def test_a_truncated_checkpoint_is_a_one_line_error(tmp_path):
    """As crate-train says of a damaged checkpoint to resume from (runs.read_checkpoint)."""
    path = tmp_path / "truncated.pth"
    torch.save(create_model("crate_micro").state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    proc = run("crate-analyze", f"ckpt_path={path}", "model=crate_micro", cwd=tmp_path)
    line = one_line_error(proc, command="crate-analyze")
    assert f"ckpt_path={path} cannot be read as a checkpoint" in line and "damaged" in line


def test_a_file_holding_python_objects_is_refused_unread(tmp_path):
    """Unpickling arbitrary objects can run code: crate-analyze reads tensors and containers only
    (crate-train unpickles more only to resume its own checkpoints, as Lightning does)."""
    path = tmp_path / "with_objects.pth"
    weights = create_model("crate_micro").state_dict()
    torch.save({"state_dict": weights, "args": argparse.Namespace(lr=1)}, path)
    proc = run("crate-analyze", f"ckpt_path={path}", "model=crate_micro", cwd=tmp_path)
    line = one_line_error(proc, command="crate-analyze")
    assert "holds objects other than tensors and plain containers" in line


@pytest.mark.slow
def test_a_released_224px_model_is_analysed_at_its_own_size(tmp_path):
    """A released CRATE-T file (14 x 14 patches of 16 px) with data=shapes, whose images are
    48 px: analysed at 224 px, with a note, unless data.image_size is given; report.json names
    the model by its create_model name."""
    released = tmp_path / "CRATE_tiny.pth"
    torch.save(to_released_state_dict(create_model("crate_tiny")), released)
    few = ["num_images=4", "num_figure_images=2", "batch_size=4", "data.val_size=4", "data.train_size=4"]
    args = [f"ckpt_path={released}", "model=crate_tiny", "data=shapes", *few]
    out = tmp_path / "own_size"
    proc = run("crate-analyze", *args, f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "note: analysing at data.image_size=224" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["image_size"] == 224 and report["model_image_size"] == 224
    assert report["model"] == "crate_tiny" and report["model_class"] == "Crate"
    assert report["notes"] == [proc.stdout.splitlines()[0].removeprefix("note: ")]
    with Image.open(out / "attention.png") as image:
        assert image.size[0] > 100

    # an image size given on the command line is kept, and the resampled position table said
    out = tmp_path / "given_size"
    proc = run("crate-analyze", *args, "data.image_size=48", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resampled from 14 x 14 to 3 x 3" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["image_size"] == 48 and report["model_image_size"] == 224


@pytest.mark.parametrize(
    "name, overrides, expected",
    [
        ("crate_tiny", {}, "crate_tiny"),
        ("crate_tiny_patch8", {"img_size": 32}, "crate_tiny_patch8"),
        ("crate_base_patch8", {"img_size": 32}, "crate_base_patch8"),  # 6 heads, unlike crate_base
        ("crate_micro", {"img_size": 48}, "crate_micro"),
        ("mae_crate_micro", {}, "mae_crate_micro"),
        ("crate_mini", {"embed_dim": 96}, "Crate of width 96, depth 4, 6 heads, 8 px patches"),
    ],
)
def test_report_names_the_model_by_its_shape(name, overrides, expected):
    from crate_lit.analysis import model_name
    from crate_lit.models import CrateMAEClassifier

    model = create_model(name, **overrides)
    assert model_name(model) == expected
    if name.startswith("mae_"):  # a linear probe is named by its encoder
        assert model_name(CrateMAEClassifier(model, 10)) == expected
