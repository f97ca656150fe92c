"""``crate-analyze``: white-box measurements of a trained CRATE or CRATE-MAE.

``crate-analyze ckpt_path=PATH data=shapes`` writes, into its own run folder, the layer-wise
coding rate and sparsity (CSV + figure), class-token attention maps of every head with their
DINO-style masks, for CRATE-MAE the decoder's output at every patch and PCA feature maps, on
``data=shapes`` the segmentation score against the ground-truth masks, and ``report.json`` with
every number. A model is analysed at the image size it was trained at unless
``data.image_size`` is given.
``task=knn`` instead measures k-NN and linear-probe accuracy on frozen features.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict

import hydra
from omegaconf import DictConfig

from . import analysis
from .configs import run_command
from .runs import config_dir
from .validation import ConfigError


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Analyse ``cfg.ckpt_path`` into ``cfg.paths.output_dir``: load, collect, summarise, write
    (see ``analysis``). Returns the report."""
    out = Path(cfg.paths.output_dir)
    loaded = analysis.load(cfg)
    if cfg.task == "whitebox":
        seen = analysis.collect_whitebox(cfg, loaded.model, loaded.datamodule)
        numbers = analysis.summarise_whitebox(cfg, seen)
        results = analysis.write_whitebox(cfg, seen, numbers, loaded.datamodule, out, loaded.epoch)
    else:
        features = analysis.collect_features(cfg, loaded.model, loaded.datamodule)
        results = analysis.summarise_knn(cfg, *features)
    return analysis.write_report(cfg, loaded, results, out)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="analyze")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as err:
        print(f"crate-analyze: error: {err}", file=sys.stderr)
        sys.exit(2)


EXAMPLES = (
    "crate-analyze ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt   # a crate-lit run's checkpoint",
    "crate-analyze ckpt_path=/ckpt/CRATE_small.pth model=crate_small        # a released file",
    "crate-analyze ckpt_path=<ckpt> task=knn data=imagenet data.root=/data/imagenet",
)


def main() -> None:
    """The ``crate-analyze`` command: its own ``--help``, one line for a mistyped group option or
    key, then Hydra composes the config and ``run`` analyses."""
    about = "White-box measurements and figures of a CRATE checkpoint (crate-lit's or a released one)."
    run_command("crate-analyze", "analyze", about, EXAMPLES, _hydra_main)


if __name__ == "__main__":
    main()
