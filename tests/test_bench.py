"""crate-bench's command line: bad arguments are one-line errors, the help is whole."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from commands import one_line_error, run_command
from crate_lit import bench

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
        (["--model", "mae_crate_tiny"], "CRATE-MAE"),
        (["--batch-size", "0"], "--batch-size"),
        (["--img-size", "30"], "not divisible by patch size 16"),
        (["--steps", "-1"], "--steps"),
        (["--device", "tpu"], "--device"),
        (["--precision", "fp8"], "--precision"),
        (["--data", "--rounds", "0"], "--rounds"),
        (["--data", "data=shapes", "data.image_size=36"], "data.image_size=36: image size (36, 36) is not"),
    ],
    ids=["typo", "mae", "batch0", "img30", "steps", "tpu", "fp8", "rounds0", "data_img36"],
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
