"""Launching the extra processes of a DDP run from inside a Hydra job (a single run or one job of
a multirun sweep)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import torch
from omegaconf import read_write

# what Lightning's DDP launcher sets in the launching process
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def ddp_launch_scope() -> Iterator[None]:
    """Lightning's DDP launcher starts the extra processes by re-running this command with
    ``hydra.run.dir`` set to the job's folder. In a multirun that command would be the whole
    sweep, so each job presents itself as a single run of its own overrides. Afterwards the
    process group and the launcher's environment go, so that the next job of the sweep starts
    its own processes instead of joining the finished ones."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    argv, env = list(sys.argv), {k: os.environ.get(k) for k in _DDP_ENV}
    if HydraConfig.initialized() and "LOCAL_RANK" not in os.environ:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
            with read_write(hydra_cfg):
                hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.argv[:] = argv
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
