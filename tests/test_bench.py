"""crate-bench's command line: bad arguments are one-line errors, the help is whole."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from commands import one_line_error, run_command
from crate_lit import bench
from crate_lit.benchmarks import default_batch_size
from crate_lit.flops import training_flops
from crate_lit.models import create_model

BIN = Path(sys.executable).parent


def _error_of(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """The stderr of ``crate-bench argv`` run in this process, which must stop with exit code 2
    before any benchmark process starts."""
    with pytest.raises(SystemExit) as stopped:
        bench.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("crate-bench: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model", "crate_tiyn"], "did you mean 'crate_tiny'?"),
        (["--model", "mae_crate_tiny", "--candidates", "plain"], "no comparison for the CRATE-MAE model"),
        (["--model", "crate_alpha_tiny", "--candidates", "crate", "plain"], "choose from crate, vit_same"),
        (["--peak-tflops", "0"], "--peak-tflops"),
        (["--batch-size", "0"], "--batch-size"),
        (["--img-size", "30"], "not divisible by patch size 16"),
        (["--steps", "-1"], "--steps"),
        (["--device", "tpu"], "--device"),
        (["--precision", "fp8"], "--precision"),
        (["--data", "--rounds", "0"], "--rounds"),
        (["--data", "data=shapes", "data.image_size=36"], "data.image_size=36: image size (36, 36) is not"),
    ],
    ids=["typo", "mae", "alpha", "peak0", "batch0", "img30", "steps", "tpu", "fp8", "rounds0", "data_img36"],
)
def test_bad_arguments_are_one_line_errors(capsys, monkeypatch, tmp_path, argv, expected):
    monkeypatch.chdir(tmp_path)  # a --data run that went ahead would write its data cache here
    assert expected in _error_of(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize(
    "argv", [["--device", "cuda"], ["--data", "data=shapes", "--device", "cuda"]], ids=["models", "data"]
)
def test_cuda_without_a_gpu_is_a_one_line_error(capsys, monkeypatch, tmp_path, argv):
    monkeypatch.chdir(tmp_path)
    assert "no CUDA GPU" in _error_of(capsys, argv)


def test_the_installed_command_reports_a_typo_in_one_line(tmp_path):
    proc = run_command("crate-bench", "--model", "crate_smal", "--img-size", "32", cwd=tmp_path)
    assert "did you mean 'crate_small'?" in one_line_error(proc, command="crate-bench")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_is_whole_with_examples(capsys):
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    # the description is every paragraph of the module's documentation, not its first line
    assert "peak memory of crate-lit's CRATE against" in out
    assert "the plain reference formulas and timm's ViT" in out
    assert "--baseline" in out and "bounds a run" in out
    # usage examples, as in README
    assert "crate-bench --precision bf16 --compile --device cuda" in out
    assert "crate-bench --data data=imagenet data.root=/data/imagenet" in out
    assert "``" not in out  # no reStructuredText markup in a terminal
    with pytest.raises(SystemExit):
        bench.main(["--data", "--help"])
    data_help = capsys.readouterr().out
    assert "--rounds" in data_help and "crate-bench --data data=imagenet" in data_help


@pytest.mark.parametrize(
    "model, peak",
    [("crate_micro", None), ("crate_alpha_micro", "0.5"), ("mae_crate_micro", "0.5")],
    ids=["crate", "crate_alpha", "crate_mae"],
)
@pytest.mark.slow
def test_flops_per_image_and_mfu_beside_images_per_second(tmp_path, model, peak):
    args = ["--model", model, "--img-size", "32", "--batch-size", "4", "--steps", "2", "--warmup", "1"]
    args += ["--device", "cpu", "--candidates", "crate", "--json"] + (["--peak-tflops", peak] if peak else [])
    proc = run_command("crate-bench", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table, listed = proc.stdout.split("\n[", 1)
    (result,) = json.loads("[" + listed)
    # its training step: a classifier's cross-entropy, a CRATE-MAE's own loss (no labels)
    images = torch.zeros(4, 3, 32, 32)
    labels = None if model.startswith("mae_") else torch.zeros(4, dtype=torch.long)
    assert result["flops_per_image"] == training_flops(create_model(model), images, labels) / 4
    header = next(line for line in table.splitlines() if line.startswith("implementation"))
    row = next(line for line in table.splitlines() if line.startswith("crate-lit"))
    assert "FLOPs/img" in header and "vs plain" not in header  # no plain reference measured
    assert f"{result['flops_per_image'] / 1e6:.3g} M" in row
    if peak is None:
        assert result["mfu"] is None and "MFU" not in header
        assert "MFU: the peak FLOP/s of the CPU is not known; give --peak-tflops" in table
    else:
        expected = result["images_per_s"] * result["flops_per_image"] / 0.5e12
        assert result["mfu"] == pytest.approx(expected, rel=1e-12) and "MFU" in header
        assert f"{result['mfu']:.2%}" in row and "MFU against a peak of 0.5 TFLOP/s (--peak-tflops)" in table


def test_default_batch_sizes_are_small_on_a_cpu_and_a_gpu_users_on_cuda():
    assert default_batch_size("crate_base", 224, "cpu") == 16
    # base-sized at 224 px: 256; the activation memory of that for larger models and more tokens
    assert default_batch_size("crate_base", 224, "cuda") == 256
    assert default_batch_size("crate_tiny", 224, "cuda") == 256
    assert default_batch_size("crate_alpha_base", 224, "cuda") == 256
    assert default_batch_size("mae_crate_base", 224, "cuda") == 128  # encoder and decoder
    assert default_batch_size("crate_large", 224, "cuda") == 64
    assert default_batch_size("crate_base_patch8", 224, "cuda") == 64
