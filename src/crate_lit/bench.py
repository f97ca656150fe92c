"""``crate-bench``: training-step throughput and peak memory of crate-lit's CRATE against
the plain reference formulas and timm's ViT, in one run; with ``--data``, the input pipeline
of a crate-train config against its model.

A training step is forward + backward + AdamW step on random images. Each candidate runs in
its own process so that peak memory (CUDA: max allocated; CPU: peak resident set growth over
the process before its first step) is its own.

``crate-bench --data [crate-train overrides]`` measures the configured training loader alone
(workers, the copy to the device and the device-side transforms: what a training step waits
for) and the model's training step alone at the same per-device batch, and says which of the
two bounds a run. ``--baseline`` adds torchvision's plain float pipeline on the same files
(ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize), for data=imagenet.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Dict, List, NoReturn

import torch

from .benchmarks import LABELS, BenchError, bench_data, check_model, run
from .configs import CommandLineError, check_command_line

EXAMPLES = """examples:
  crate-bench                      # CRATE-T, 224 px, batch 16, fp32, on the GPU if there is one
  crate-bench --precision bf16 --compile --device cuda
  crate-bench --model crate_small --batch-size 32 --candidates crate vit_tiny plain
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
    parser.add_argument("--model", default="crate_tiny", help="a CRATE classifier name (default crate_tiny)")
    parser.add_argument(
        "--img-size", type=_count(1), default=224, help="image side in pixels, a multiple of the patch size"
    )
    parser.add_argument("--batch-size", type=_count(1), default=16, help="images per training step")
    parser.add_argument("--steps", type=_count(1), default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=_count(0), default=2, help="untimed steps first")
    parser.add_argument(
        "--device", default=_default_device(), help="cpu or cuda (default: cuda if there is one)"
    )
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile every candidate")
    parser.add_argument("--threads", type=_count(0), default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--candidates", nargs="+", default=list(LABELS), choices=list(LABELS), help="what to measure"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)
    check_device(args.device)
    check_model(args.model, args.img_size)
    results = run(args)
    threads = args.threads or torch.get_num_threads()
    print(
        f"crate-bench: {args.model} at {args.img_size} px, batch {args.batch_size}, {args.precision}, "
        f"{args.device} ({threads} threads), median of {args.steps} training steps"
        + (", torch.compile" if args.compile else "")
    )
    plain = next((r["images_per_s"] for r in results if r["kind"] == "plain"), math.nan)
    print(f"{'implementation':<36}{'params':>12}{'images/s':>11}{'peak MiB':>10}{'vs plain':>10}")
    for r in results:
        print(
            f"{LABELS[r['kind']]:<36}{r['params']:>12,}{r['images_per_s']:>11.2f}{r['peak_mib']:>10.0f}"
            f"{r['images_per_s'] / plain:>9.2f}x"
        )
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()


if __name__ == "__main__":
    main()
