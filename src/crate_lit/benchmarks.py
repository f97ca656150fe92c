"""What ``crate-bench`` measures: a model's training step in a process of its own (``run``) and
a crate-train config's input pipeline against its model (``bench_data``).

The measuring runs in processes started with the spawn method, so what they run (``_measure``)
is a module-level function here, importable in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import difflib
import math
import multiprocessing as mp
import resource
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .flops import device_peak_tflops, mfu, training_flops, training_loss
from .models import Crate, create_model
from .models.factory import MODEL_NAMES, family


class BenchError(ValueError):
    """An argument or a measurement that cannot work; reported as one line."""


def check_model(
    name: str,
    img_size: int,
    kwargs: Optional[Dict[str, Any]] = None,
    keys: Tuple[str, str] = ("--model ", "--img-size "),
) -> None:
    """Build ``name`` (with the constructor values ``kwargs``) on the meta device, which takes
    no memory and no time, to refuse what the benchmark processes could not build: an unknown
    name, an image size the patches do not divide. ``keys`` name the two settings in the
    message (``model=``, ``data.image_size=`` for --data)."""
    model, size = f"{keys[0]}{name}", f"{keys[1]}{img_size}"
    if name not in MODEL_NAMES:
        close = difflib.get_close_matches(name, list(MODEL_NAMES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; choose one of {', '.join(MODEL_NAMES)}"
        raise BenchError(f"{model} is unknown{hint}")
    try:
        with torch.device("meta"):
            create_model(name, **{**(kwargs or {}), "img_size": img_size})
    except (ValueError, TypeError) as err:
        raise BenchError(f"{model} at {size}: {str(err).splitlines()[0]}") from None


def check_candidates(name: str, candidates: Optional[List[str]]) -> List[str]:
    """The implementations to measure for model ``name``: ``candidates``, or all that compare
    with its family when None (the plain reference formulas are CRATE's; timm's ViT is a
    classifier, no comparison for a CRATE-MAE pre-training step)."""
    allowed = CANDIDATES[family(name)]
    for kind in candidates or ():
        if kind not in allowed:
            raise BenchError(
                f"--candidates {kind} ({LABELS[kind]}) is no comparison for the {family(name)} model "
                f"{name}; choose from {', '.join(allowed)}"
            )
    return list(candidates or allowed)


def default_batch_size(name: str, img_size: int, device: str) -> int:
    """16 images on a CPU. On a GPU 256 for a base-sized model at 224 px (197 tokens, width 768,
    12 layers) and, for another, about as many as take the same activation memory (which grows
    with tokens x width x layers, the decoder's counted), a power of two from 8 to 256."""
    if torch.device(device).type != "cuda":
        return 16
    with torch.device("meta"):
        model = create_model(name, img_size=img_size)
    tokens = model.patch_embed.num_patches + 1
    layers = len(model.blocks) + len(getattr(model, "decoder_blocks", ()))
    images = 256 * (197 * 768 * 12) / (tokens * model.embed_dim * layers)
    return int(min(256, max(8, 2 ** math.floor(math.log2(images)))))


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

    # the model config's constructor values (crate-bench --data), else the named model's own
    reference = create_model(args.model, **{"img_size": args.img_size, **getattr(args, "model_kwargs", {})})
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
    try:
        _measure_steps(kind, args, queue)
    except torch.cuda.OutOfMemoryError:
        # a batch too large for the GPU is the caller's to change, not a failure to trace
        queue.put({"kind": kind, "error": f"out of GPU memory at --batch-size {args.batch_size}"})


def _measure_steps(kind: str, args: argparse.Namespace, queue: Any) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads) if args.threads else None
    device = torch.device(args.device)
    if device.type == "cuda":  # as crate-train does; a CPU keeps torch's default
        torch.set_float32_matmul_precision(args.float32_matmul_precision)
    model = _build(kind, args).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    # a CRATE-MAE's training step needs no labels: its forward returns the loss
    mae = family(args.model) == "CRATE-MAE"
    labels = None if mae else torch.randint(0, model.num_classes, (args.batch_size,), device=device)
    flops_per_image = training_flops(model, images, labels) / args.batch_size
    if args.compile:
        model = torch.compile(model, mode=getattr(args, "compile_mode", None))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = training_loss(model, images, labels)
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
    rate = args.batch_size / median
    peak_tflops = args.peak_tflops or device_peak_tflops(device, args.precision)
    queue.put(
        {
            "kind": kind,
            "images_per_s": rate,
            "peak_mib": peak,
            "params": params,
            "flops_per_image": flops_per_image,
            "peak_tflops": peak_tflops,
            "mfu": mfu(rate, flops_per_image, peak_tflops) if peak_tflops else None,
        }
    )


LABELS = {
    "crate": "crate-lit CRATE (fast path)",
    "plain": "plain reference formulas",
    "vit_same": "timm ViT, same width/depth/heads",
    "vit_tiny": "timm vit_tiny_patch16_224",
}
# what each family is compared with (check_candidates)
CANDIDATES = {
    "CRATE": tuple(LABELS),
    "CRATE-alpha": ("crate", "vit_same", "vit_tiny"),
    "CRATE-MAE": ("crate",),
}


def label(kind: str, model: str) -> str:
    """How crate-bench names the implementation ``kind`` of model ``model``."""
    if kind == "crate" and family(model) != "CRATE":
        return f"crate-lit {family(model)}" + (" (pre-training step)" if family(model) == "CRATE-MAE" else "")
    return LABELS[kind]


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    ctx = mp.get_context("spawn")
    results = []
    for kind in args.candidates:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(kind, args, queue))
        proc.start()
        proc.join()
        if proc.exitcode is not None and proc.exitcode < 0:
            # the kernel's out-of-memory killer leaves no traceback, only the signal
            raise BenchError(
                f"the {label(kind, args.model)} benchmark was killed by signal {-proc.exitcode} (out of "
                "memory?); lower --batch-size or --img-size"
            )
        if proc.exitcode != 0:  # its traceback is above
            raise RuntimeError(f"benchmark of {kind} failed (exit code {proc.exitcode})")
        result = queue.get()
        if "error" in result:
            error = result["error"]
            raise BenchError(f"{label(kind, args.model)}: {error}; lower --batch-size or --img-size")
        results.append(result)
    return results


def _loader_rate(loader: Any, to_input: Any, device: torch.device, batches: int, warmup: int) -> float:
    """Images/s of ``batches`` batches of ``loader`` made model inputs on ``device``, after
    ``warmup`` batches (worker start-up)."""
    count, started = 0, None
    for i, batch in enumerate(loader):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        if i >= warmup:
            count += len(batch[0])
        to_input(batch)
        if i + 1 >= warmup + batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    if started is None or count == 0:
        raise ValueError(
            f"the loader gave fewer than {warmup + 1} batches; lower --batches or raise the data size"
        )
    return count / (time.perf_counter() - started)


def _torchvision_loader(datamodule: Any) -> Any:
    from torchvision import datasets
    from torchvision import transforms as T

    hp = datamodule.hparams
    transform = T.Compose(
        [
            T.RandomResizedCrop(hp.image_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(datamodule.mean, datamodule.std),
        ]
    )
    dataset = datasets.ImageFolder(f"{hp.root}/train", transform=transform)
    return torch.utils.data.DataLoader(
        dataset, batch_size=hp.batch_size, shuffle=True, num_workers=hp.num_workers, drop_last=True
    )


def bench_data(
    overrides: List[str], batches: int, warmup: int, baseline: bool, device: str, rounds: int = 1
) -> Dict[str, Any]:
    """Loader-only and model-only training images/s of the crate-train config ``overrides``: the
    loader to model input (workers, transfer, device step), its workers alone (uint8 batches as
    they leave the CPU side) and, with ``baseline``, torchvision's float pipeline on the same files;
    each the best of ``rounds`` alternating rounds."""
    from hydra import compose, initialize_config_dir

    from .building import build_datamodule
    from .configs import to_container
    from .runs import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    model_kwargs = {k: v for k, v in to_container(cfg.model).items() if k not in ("name", "pretrained")}
    # before the loader is measured, which can take minutes
    check_model(str(cfg.model.name), int(cfg.data.image_size), model_kwargs, ("model=", "data.image_size="))
    if baseline and cfg.data.name != "imagenet":
        raise ValueError(
            "--baseline compares with torchvision's ImageFolder pipeline: use it with data=imagenet"
        )
    target = torch.device(device)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")

    def to_input(batch: Any) -> Any:
        batch = datamodule.on_before_batch_transfer(batch, 0)
        images, labels, keys = (x.to(target, non_blocking=True) for x in batch)
        return datamodule.train_batch(images, keys), labels

    def to_float(batch: Any) -> Any:
        return batch[0].to(target, non_blocking=True)

    def nothing(batch: Any) -> None:
        return None

    # Loaders alternate (A B A B ...) and each keeps its best round, so that a slow spell of a
    # shared machine does not land on one side of the comparison only.
    rates: Dict[str, List[float]] = {"loader_images_per_s": [], "workers_images_per_s": []}
    if baseline:
        rates["torchvision_images_per_s"] = []
    for _ in range(rounds):
        rates["loader_images_per_s"].append(
            _loader_rate(datamodule.train_dataloader(), to_input, target, batches, warmup)
        )
        rates["workers_images_per_s"].append(
            _loader_rate(datamodule.train_dataloader(), nothing, target, batches, warmup)
        )
        if baseline:
            rates["torchvision_images_per_s"].append(
                _loader_rate(_torchvision_loader(datamodule), to_float, target, batches, warmup)
            )
    result: Dict[str, Any] = {
        "data": cfg.data.name,
        "batch_size": int(datamodule.hparams.batch_size),
        "num_workers": int(datamodule.hparams.num_workers),
        "rounds": rounds,
        **{name: max(values) for name, values in rates.items()},
    }
    model_args = argparse.Namespace(
        model=str(cfg.model.name), img_size=int(cfg.data.image_size), batch_size=result["batch_size"],
        steps=5, warmup=2, device=device, precision={"bf16-mixed": "bf16", "16-mixed": "fp16"}.get(
            str(cfg.trainer.precision), "fp32"), compile=bool(cfg.get("compile")), threads=0,
        candidates=["crate"], model_kwargs=model_kwargs, compile_mode=cfg.get("compile_mode"),
        float32_matmul_precision=str(cfg.get("float32_matmul_precision", "high")), peak_tflops=None,
    )  # fmt: skip
    model = run(model_args)[0]
    result["model_images_per_s"] = model["images_per_s"]
    result["bound_by"] = "data" if result["loader_images_per_s"] < model["images_per_s"] else "model"
    return result
