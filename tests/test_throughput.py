"""Training FLOPs per image and MFU: the meta-device count against a hand formula and a count on
real tensors, the peak table, and what crate-train logs (metrics.csv, summary.json)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from commands import QUICK, crate_train, metric_rows, one_line_error, summary_of
from crate_lit import flops
from crate_lit.models import create_model
from crate_lit.modules import build_classifier


def _batch(model_name: str, size: int = 3) -> tuple[torch.Tensor, torch.Tensor | None]:
    images = torch.randn(size, 3, 32, 32)
    labels = None if model_name.startswith("mae_") else torch.randint(0, 10, (size,))
    return images, labels


@pytest.mark.parametrize("batch", [1, 4])
def test_crate_training_flops_are_the_hand_formula(batch):
    """Every matrix product of CRATE three times (forward, gradient of its input, gradient of its
    weight: every input carries a gradient, the patches through the tokenizer's LayerNorm), and
    the ISTA step matrix M = I + eta (D - D^T D) once per step, not per image."""
    model = create_model("crate_micro")  # 32 px, patch 8, width 32, 2 layers, 2 heads, 10 classes
    patches, tokens, width, depth, classes, patch_dim = 16, 17, 32, 2, 10, 8 * 8 * 3
    per_image = (
        2 * patches * patch_dim * width  # patch embedding
        + depth * 3 * 2 * tokens * width * width  # U, the merge, x @ M
        + depth * 2 * 2 * tokens * tokens * width  # scores and their weighted sum, over the heads
        + 2 * width * classes  # head
    )
    per_step = depth * 2 * width**3  # D^T D
    images, labels = _batch("crate_micro", batch)
    assert flops.training_flops(model, images, labels) == 3 * (batch * per_image + per_step)


def _probe() -> torch.nn.Module:
    """A linear probe on a CRATE-MAE encoder as task=linear_probe trains it: the encoder frozen
    and in eval mode, the head's BatchNorm (running statistics) training."""
    model = build_classifier({"name": "mae_crate_micro", "num_classes": 10}, linear_probe=True)
    model.requires_grad_(False)
    model.get_classifier().requires_grad_(True)
    model.eval()
    model.get_classifier().train()
    return model


@pytest.mark.parametrize(
    "name", ["crate_micro", "crate_alpha_micro", "mae_crate_micro", "probe"], ids=lambda n: n
)
def test_the_meta_count_is_the_real_count_and_touches_nothing(name):
    torch.manual_seed(0)
    if name == "probe":
        model, (images, labels) = _probe(), _batch("crate_micro")
    else:  # dropout and stochastic depth on: they draw random numbers in training
        extra = (
            {"drop_path_rate": 0.2}
            if name.startswith("mae_")
            else {"drop_path_rate": 0.2, "proj_drop_rate": 0.1}
        )
        model, (images, labels) = create_model(name, **extra).train(), _batch(name)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()

    counted = flops.training_flops(model, images, labels)

    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # BatchNorm statistics included
    # the same step on real tensors; attention through its matrix products, as the count defines it
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as real:
        flops.training_loss(model, images, labels).backward()
    assert counted == real.get_total_flops() > 0
    if name == "probe":  # the frozen encoder is run forward only
        assert counted < flops.training_flops(model.requires_grad_(True), images, labels)


def test_a_model_compiled_in_place_is_counted_as_it_was():
    model = create_model("crate_micro")
    images, labels = _batch("crate_micro")
    eager = flops.training_flops(model, images, labels)
    model.compile()
    assert flops.training_flops(model, images, labels) == eager


def test_the_peak_follows_the_gpu_and_the_precision(monkeypatch):
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert flops.device_peak_tflops(gpu, "bf16-mixed") == flops.device_peak_tflops(gpu, "16-mixed") == 989.0
    default = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert flops.device_peak_tflops(gpu, "32-true") == flops.device_peak_tflops(gpu, "fp32") == 494.5
        torch.set_float32_matmul_precision("highest")
        assert flops.device_peak_tflops(gpu, "32-true") == 67.0
    finally:
        torch.set_float32_matmul_precision(default)
    assert flops.device_peak_tflops(gpu, "64-true") is None
    assert flops.device_peak_tflops(cpu, "bf16-mixed") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert flops.device_peak_tflops(gpu, "bf16-true") == 312.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert flops.device_peak_tflops(gpu, "bf16-mixed") is None  # a lower peak, not H100 SXM's
    # 2,000 images/s of 40 GFLOPs each on a 989 TFLOP/s device: 80 TFLOP/s of 989
    assert flops.mfu(2000.0, 40e9, 989.0) == pytest.approx(80 / 989, rel=1e-12)


def _epoch_rows(run_dir) -> list[dict]:
    return [row for row in metric_rows(run_dir) if row.get("perf/images_per_sec")]


@pytest.mark.slow
def test_a_run_with_a_peak_logs_flops_and_mfu_every_epoch(tmp_path):
    proc = crate_train(
        *QUICK, "callbacks.throughput.peak_tflops=0.5", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, rows = summary_of(tmp_path / "run"), _epoch_rows(tmp_path / "run")
    # crate_micro's step on batches of 16 images of 32 px
    images, labels = torch.zeros(16, 3, 32, 32), torch.zeros(16, dtype=torch.long)
    per_image = flops.training_flops(create_model("crate_micro"), images, labels) / 16
    throughput = summary["throughput"]
    assert throughput["flops_per_image"] == per_image and throughput["peak_tflops"] == 0.5
    assert len(rows) == 2  # one per epoch
    for row in rows:
        assert float(row["perf/flops_per_image"]) == pytest.approx(per_image, rel=1e-6)
        expected = float(row["perf/images_per_sec"]) * per_image / 0.5e12
        assert float(row["perf/mfu"]) == pytest.approx(expected, rel=1e-5)
    last = rows[-1]
    assert throughput["images_per_sec"] == pytest.approx(float(last["perf/images_per_sec"]), rel=1e-6)
    assert throughput["mfu"] == pytest.approx(float(last["perf/mfu"]), rel=1e-6)
    assert summary["metrics"]["perf/mfu"] == pytest.approx(throughput["mfu"], rel=1e-6)


@pytest.mark.slow
def test_a_run_without_a_known_peak_logs_flops_but_no_mfu(tmp_path):
    args = [a for a in QUICK if not a.startswith("model=")]
    proc = crate_train(
        *args, "task=mae", "model=mae_crate_micro", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, rows = summary_of(tmp_path / "run"), _epoch_rows(tmp_path / "run")
    # the CRATE-MAE's own loss at the run's mask ratio, no labels
    counted = flops.training_flops(
        create_model("mae_crate_micro"), torch.zeros(16, 3, 32, 32), mask_ratio=0.75
    )
    assert summary["throughput"]["flops_per_image"] == counted / 16
    assert summary["throughput"]["mfu"] is None and summary["throughput"]["peak_tflops"] is None
    assert "perf/mfu" not in summary["metrics"]
    assert len(rows) == 2 and not any(row.get("perf/mfu") for row in rows)
    said = proc.stdout + proc.stderr
    assert said.count("perf/mfu is not logged: the peak FLOP/s of the CPU") == 1
    assert "callbacks.throughput.peak_tflops=" in said


@pytest.mark.parametrize(
    "override, expected",
    [
        ("compile_mode=max-autotun", "unknown compile_mode 'max-autotun'; choose null or one of default, "),
        ("float32_matmul_precision=hihg", "unknown float32_matmul_precision 'hihg'; choose highest"),
        ("callbacks.throughput.peak_tflops=-1", "peak_tflops must be null or the peak TFLOP/s of one device"),
    ],
    ids=["compile_mode", "matmul_precision", "peak"],
)
def test_speed_setting_typos_are_one_line_errors(tmp_path, override, expected):
    proc = crate_train(*QUICK, override, cwd=tmp_path)
    assert expected in one_line_error(proc)
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))  # refused before anything was built


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_float32_matmul_precision_is_left_alone_on_the_cpu(tmp_path):
    from hydra import compose, initialize_config_dir

    from crate_lit.building import build_trainer
    from crate_lit.runs import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=cpu", "float32_matmul_precision=medium"])
    default = torch.get_float32_matmul_precision()
    try:
        build_trainer(cfg, tmp_path, callbacks=[], loggers=[])
        # the key is for a GPU's tensor cores ("medium" multiplies float32 in bfloat16 where a fast
        # algorithm exists): a CPU run keeps torch's default
        assert torch.get_float32_matmul_precision() == default
    finally:
        torch.set_float32_matmul_precision(default)
