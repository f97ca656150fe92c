"""``crate-pack``: pack a dataset in class folders into WebDataset tar shards for
``data=imagenet_shards`` (see ``crate_lit.data.shards``)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from .data.loading import DataError
from .data.shards import pack_folders
from .runs import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="pack")
def main(cfg: DictConfig) -> None:
    try:
        manifest = pack_folders(str(cfg.data.root), str(cfg.out), int(float(cfg.shard_mib) * (1 << 20)))
    except (OSError, ValueError, DataError) as err:
        print(f"crate-pack: error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['samples']} images in {len(entry['shards'])} shards")
    print(f"wrote {cfg.out}; train on it with data=imagenet_shards data.root={cfg.out}")


if __name__ == "__main__":
    main()
