"""``crate-bench``: training-step throughput and peak memory of crate-lit's CRATE against
the plain reference formulas and timm's ViT, in one run.

A training step is forward + backward + AdamW step on random images. Each candidate runs in
its own process so that peak memory (CUDA: max allocated; CPU: peak resident set growth over
the process before its first step) is its own.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import sys
import time
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import Crate, create_model


class PlainCrate(Crate):
    """The same parameters computed the way the released code does: explicit softmax
    attention on materialised score matrices and the three-product ISTA step."""

    def forward_features(self, x: Tensor) -> Tensor:
        z = self._embed(x)
        for block in self.blocks:
            mssa, ista = block.mssa, block.ista
            w = mssa.project(block.norm1(z))
            attn = torch.softmax(torch.matmul(w, w.transpose(-1, -2)) * mssa.scale, dim=-1)
            z = z + mssa.merge(torch.matmul(attn, w))
            h = block.norm2(z)
            d_h = F.linear(h, ista.dictionary)
            dt_d_h = F.linear(d_h, ista.dictionary.t())
            dt_h = F.linear(h, ista.dictionary.t())
            update = ista.step_size * (dt_h - dt_d_h) - ista.step_size * ista.lambd
            z = F.relu(h + update)
        return z


def _build(kind: str, args: argparse.Namespace) -> torch.nn.Module:
    import timm

    reference = create_model(args.model, img_size=args.img_size)
    if kind == "crate":
        return reference
    # the reference's shape, for the plain CRATE and for timm's ViT of the same width and depth
    shape = dict(
        img_size=args.img_size,
        patch_size=reference.patch_embed.patch_size,
        num_classes=reference.num_classes,
        embed_dim=reference.embed_dim,
        depth=len(reference.blocks),
        num_heads=reference.blocks[0].mssa.num_heads,
    )
    if kind == "plain":
        plain = PlainCrate(**shape)
        plain.load_state_dict(reference.state_dict())
        return plain
    if kind == "vit_same":
        return timm.create_model("vit_small_patch16_224", **shape)
    if kind == "vit_tiny":
        return timm.create_model(
            "vit_tiny_patch16_224",
            img_size=args.img_size,
            patch_size=reference.patch_embed.patch_size,
            num_classes=reference.num_classes,
        )
    raise ValueError(kind)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measure(kind: str, args: argparse.Namespace, queue: Any) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads) if args.threads else None
    device = torch.device(args.device)
    model = _build(kind, args).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    if args.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, model.num_classes, (args.batch_size,), device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    base_rss = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    sync()
    times: List[float] = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mib() - base_rss
    queue.put({"kind": kind, "images_per_s": args.batch_size / median, "peak_mib": peak, "params": params})


LABELS = {
    "crate": "crate-lit CRATE (fast path)",
    "plain": "plain reference formulas",
    "vit_same": "timm ViT, same width/depth/heads",
    "vit_tiny": "timm vit_tiny_patch16_224",
}


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    ctx = mp.get_context("spawn")
    results = []
    for kind in args.candidates:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(kind, args, queue))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"benchmark of {kind} failed (exit code {proc.exitcode})")
        results.append(queue.get())
    return results


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="crate-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="crate_tiny", help="a CRATE classifier name (default crate_tiny)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile every candidate")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--candidates", nargs="+", default=list(LABELS), choices=list(LABELS), help="what to measure"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)
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
