"""What a finished (or stopped) run reports: ``summary.json`` and the lines printed at its end."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import lightning as L
import torch

from .callbacks import ThroughputLogger
from .loggers import AppendingCSVLogger
from .runs import pasteable


def metrics_file(loggers: List[Any]) -> str | None:
    for logger in loggers:
        if isinstance(logger, AppendingCSVLogger):
            return logger.metrics_path
    return None


def float_metrics(metrics: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items()) if torch.is_tensor(v) and v.numel() == 1}


def print_summary(summary: Dict[str, Any], path: Path) -> None:
    metrics = summary["metrics"]
    shown = [k for k in ("val/acc1", "val/acc5") if k in metrics]
    shown = shown or [k for k in ("val/loss",) if k in metrics]
    values = ", ".join(f"{k} {metrics[k]:.4f}" for k in shown) or "no validation metrics"
    took = f"in {summary['wall_time_s']:.1f} s"
    resumed, total = summary.get("resumed_from"), summary.get("total_wall_time_s")
    if resumed:
        step, part = resumed["global_step"], summary["wall_time_s"]
        took = (  # the time of every part, not only of the resumed one
            f"in {total:.1f} s, {part:.1f} s of them in this run (resumed at step {step})"
            if total is not None
            else f"(this run, resumed at step {step}, took {part:.1f} s)"
        )
    # paths as they paste back after key= into a shell (quoted for Hydra when they need it)
    shown_path = summary["checkpoints"]["best"] or summary["checkpoints"]["last"]
    lines = [
        f"{values} after {summary['epochs']} epochs {took}",
        f"checkpoint: {pasteable(shown_path) if shown_path else None}",
        f"metrics:    {pasteable(summary['metrics_file']) if summary['metrics_file'] else None}",
        f"config:     {pasteable(summary['config'])}",
        f"summary:    {pasteable(path)}",
    ]
    print("\n".join(lines), flush=True)


def run_summary(
    trainer: L.Trainer,
    loggers: List[Any],
    output_dir: Path,
    wall_time_s: float,
    total_wall_time_s: float | None,
    resumed_from: Dict[str, Any] | None,
    best_validation: Dict[str, float] | None,
    signal: str | None,
) -> Dict[str, Any]:
    """The content of ``summary.json``."""
    checkpoint = trainer.checkpoint_callback  # the first one: the best by its monitor
    last = [c.best_model_path for c in trainer.checkpoint_callbacks if getattr(c, "monitor", 1) is None]
    summary = {
        "status": "interrupted" if signal else "finished",
        "metrics": float_metrics(trainer.callback_metrics),
        "best": {
            "monitor": getattr(checkpoint, "monitor", None),
            "score": float(checkpoint.best_model_score)
            if getattr(checkpoint, "best_model_score", None) is not None
            else None,
        },
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "wall_time_s": round(wall_time_s, 2),
        # this run's part plus the time its checkpoint had recorded, over every resume (None when
        # the checkpoint it resumed from was written before crate-train recorded the time)
        "total_wall_time_s": round(total_wall_time_s, 2) if total_wall_time_s is not None else None,
        "resumed_from": resumed_from,
        "checkpoints": {
            "best": getattr(checkpoint, "best_model_path", "") or None,
            "last": (last[0] if last else getattr(checkpoint, "last_model_path", "")) or None,
        },
        "best_validation": best_validation,
        # exact, where the logged perf/* metrics are float32
        "throughput": next((c.summary() for c in trainer.callbacks if isinstance(c, ThroughputLogger)), None),
        "metrics_file": metrics_file(loggers),
        "config": str(output_dir / ".hydra" / "config.yaml"),
        "output_dir": str(output_dir),
    }
    if signal:
        summary["signal"] = signal
    return summary
