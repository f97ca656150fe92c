"""Seeds made of integers: the run's seed and seeds derived from it that every process and
machine computes alike. The data pipeline keys each training image's augmentation on
``stable_seed(seed, epoch, index)``; the modules seed their evaluation draws the same way."""

from __future__ import annotations

import hashlib
import os


def global_seed() -> int:
    """The run's seed, as ``L.seed_everything`` left it for every process (0 when unset)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def stable_seed(*parts: int) -> int:
    """A 63-bit seed made of integers, e.g. (seed, epoch, index): the same in every process and
    on every machine, which Python's ``hash`` does not promise."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
