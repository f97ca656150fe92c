"""``crate-bench``: training-step throughput and peak memory of crate-lit's CRATE against
the plain reference formulas and timm's ViT, in one run; with ``--data``, the input pipeline
of a crate-train config against its model.

A training step is forward + backward + AdamW step on random images: a classifier's
cross-entropy (CRATE, CRATE-alpha), or a CRATE-MAE's own masked-patch loss (mask ratio 0.75).
Each candidate runs in its own process so that peak memory (CUDA: max allocated; CPU: peak
resident set growth over the process before its first step) is its own. FLOPs/img are the
matrix-product FLOPs of its training step's forward and backward (counted once on meta
tensors; attention as its matrix products), and MFU their rate over the device's peak:
NVIDIA's figure for an H100 SXM, H200 or A100 at the precision (fp32: TF32 with
--float32-matmul-precision high or medium), or --peak-tflops; with neither, no MFU.

``crate-bench --data [crate-train overrides]`` measures the configured training loader alone
(workers, the copy to the device and the device-side transforms: what a training step waits
for) and the model's training step alone at the same per-device batch, and says which of the
two bounds a run. ``--baseline`` adds torchvision's plain float pipeline on the same files
(ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize), for data=imagenet.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, NoReturn

import torch

from .benchmarks import (
    LABELS,
    BenchError,
    bench_data,
    check_candidates,
    check_model,
    default_batch_size,
    label,
    run,
)
from .configs import CommandLineError, check_command_line
from .flops import device_description

EXAMPLES = """examples:
  crate-bench                      # CRATE-T, 224 px, fp32, on the GPU if there is one
  crate-bench --precision bf16 --compile --device cuda
  crate-bench --model crate_small --batch-size 32 --candidates crate vit_tiny plain
  crate-bench --model mae_crate_base --precision bf16 --peak-tflops 756   # MFU on an H100 PCIe
  crate-bench --data data=imagenet data.root=/data/imagenet model=crate_tiny trainer.precision=bf16-mixed
  crate-bench --data data=imagenet data.root=/data/imagenet --baseline   # and torchvision's pipeline

crate-bench --data --help lists the options of --data.
"""


def _fail(message: str) -> NoReturn:
    print(f"crate-bench: error: {message}", file=sys.stderr)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are crate-bench's one line (argparse's own prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        _fail(message)


def _help_text() -> str:
    # the whole module documentation, without its reStructuredText literals
    return (__doc__ or "").replace("``", "").strip()


def _count(minimum: int) -> Any:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _positive(text: str) -> float:
    """An argparse type: a positive number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _flops(value: float) -> str:
    """A FLOP count with its SI prefix: 10.8 G."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g} "


def check_device(name: str) -> torch.device:
    """The device ``--device`` names, refused here rather than in every benchmark process."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BenchError(f"--device {name} is not a device; use cpu or cuda (cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {name}: crate-bench times cpu and cuda devices only")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def _print_data(result: Dict[str, Any], device: str) -> None:
    print(
        f"crate-bench --data: data={result['data']}, batch {result['batch_size']} per device, "
        f"{result['num_workers']} workers, {device}"
    )
    rows = [
        ("training loader (to model input)", "loader_images_per_s"),
        ("its workers alone (uint8 batches)", "workers_images_per_s"),
    ]
    tv = result.get("torchvision_images_per_s")
    for name, key in rows:
        versus = f"  ({result[key] / tv:.2f}x torchvision)" if tv else ""
        print(f"{name:<44}{result[key]:>10.1f} images/s{versus}")
    if tv:
        print(f"{'torchvision float pipeline, same files':<44}{tv:>10.1f} images/s")
    print(f"{'model training step alone':<44}{result['model_images_per_s']:>10.1f} images/s")
    print(f"bound by the {result['bound_by']}")


def main(argv: List[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if "--data" in argv:
            _main_data(argv)
        else:
            _main_models(argv)
    except BenchError as err:
        _fail(str(err))


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _main_data(argv: List[str]) -> None:
    data = _Parser(
        prog="crate-bench --data",
        usage="crate-bench --data [options] [crate-train overrides ...]",
        description=_help_text(),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data.add_argument(
        "--data", action="store_true", help="measure the input pipeline of a crate-train config"
    )
    data.add_argument("--batches", type=_count(1), default=20, help="timed batches")
    data.add_argument("--warmup", type=_count(0), default=3, help="batches before timing (worker start-up)")
    data.add_argument("--baseline", action="store_true", help="also torchvision's pipeline (data=imagenet)")
    data.add_argument(
        "--rounds", type=_count(1), default=1, help="alternating rounds; each loader's best counts"
    )
    data.add_argument(
        "--device", default=_default_device(), help="cpu or cuda (default: cuda if there is one)"
    )
    data.add_argument("--json", action="store_true", help="print the result as JSON too")
    known, overrides = data.parse_known_args(argv)
    check_device(known.device)
    try:
        check_command_line("train", overrides)
    except CommandLineError as err:
        raise BenchError(str(err)) from None
    try:
        result = bench_data(
            overrides, known.batches, known.warmup, known.baseline, known.device, known.rounds
        )
    except (ValueError, OSError) as err:
        raise BenchError(str(err).splitlines()[0]) from None
    _print_data(result, known.device)
    if known.json:
        json.dump(result, sys.stdout, indent=2)
        print()


def _main_models(argv: List[str]) -> None:
    parser = _Parser(
        prog="crate-bench",
        description=_help_text(),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", default="crate_tiny", help="a CRATE, CRATE-alpha or CRATE-MAE model (default crate_tiny)"
    )
    parser.add_argument(
        "--img-size", type=_count(1), default=224, help="image side in pixels, a multiple of the patch size"
    )
    parser.add_argument(
        "--batch-size",
        type=_count(1),
        default=None,
        help="images per training step (default: 16 on a CPU; on a GPU 256 for a base-sized model at "
        "224 px, fewer for larger ones, down to 8)",
    )
    parser.add_argument("--steps", type=_count(1), default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=_count(0), default=2, help="untimed steps first")
    parser.add_argument(
        "--device", default=_default_device(), help="cpu or cuda (default: cuda if there is one)"
    )
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile every candidate")
    parser.add_argument(
        "--float32-matmul-precision",
        choices=("highest", "high", "medium"),
        default="highest",
        help="torch.set_float32_matmul_precision on a GPU (crate-train's default is high: TF32)",
    )
    parser.add_argument(
        "--peak-tflops", type=_positive, help="peak TFLOP/s of the device for MFU (default: NVIDIA's figure)"
    )
    parser.add_argument("--threads", type=_count(0), default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--candidates",
        nargs="+",
        choices=list(LABELS),
        help="what to measure (default: all that compare with the model's family)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)
    device = check_device(args.device)
    check_model(args.model, args.img_size)
    args.candidates = check_candidates(args.model, args.candidates)
    if args.batch_size is None:
        args.batch_size = default_batch_size(args.model, args.img_size, args.device)
    results = run(args)
    threads = args.threads or torch.get_num_threads()
    print(
        f"crate-bench: {args.model} at {args.img_size} px, batch {args.batch_size}, {args.precision}, "
        f"{args.device} ({threads} threads), median of {args.steps} training steps"
        + (", torch.compile" if args.compile else "")
    )
    peak = results[0]["peak_tflops"]
    if peak is None:
        print(f"MFU: the peak FLOP/s of {device_description(device)} is not known; give --peak-tflops")
    else:
        source = "--peak-tflops" if args.peak_tflops else f"{device_description(device)}, {args.precision}"
        print(f"MFU against a peak of {peak:g} TFLOP/s ({source})")
    plain = next((r["images_per_s"] for r in results if r["kind"] == "plain"), None)
    header = f"{'implementation':<40}{'params':>12}{'images/s':>11}{'FLOPs/img':>11}"
    header += f"{'MFU':>8}" * (peak is not None) + f"{'peak MiB':>10}" + f"{'vs plain':>10}" * bool(plain)
    print(header)
    for r in results:
        line = f"{label(r['kind'], args.model):<40}{r['params']:>12,}{r['images_per_s']:>11.2f}"
        line += f"{_flops(r['flops_per_image']):>11}"
        line += f"{r['mfu']:>8.2%}" if peak is not None else ""
        line += f"{r['peak_mib']:>10.0f}"
        line += f"{r['images_per_s'] / plain:>9.2f}x" if plain else ""
        print(line)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()


if __name__ == "__main__":
    main()
