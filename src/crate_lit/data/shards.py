"""ImageNet-style datasets packed into a few large tar shards, and read back from them.

The format is WebDataset's: each shard is a plain POSIX tar file in which a sample is the
members sharing a basename, ``<key>.<ext>`` (the image file's bytes, unchanged) and
``<key>.cls`` (its class index in ASCII). Any WebDataset reader (``webdataset``, NVIDIA DALI,
``tar tf``) reads them; nothing about them is specific to crate-lit. We picked it over
``litdata``'s chunk format for that reason: a shard is inspectable with standard tools and
the packed bytes are the original JPEGs, re-encoded by nothing.

Beside the shards, ``<split>.index.npy`` holds one row per sample (shard, byte offset, byte
count, label) and ``shards.json`` the class names, shard sizes and sample counts. With the
index a shard is read by random access (``os.pread``), so the shards slot into the same
sampler as the folder layout: the (seed, epoch) order and augmentation, the split over DDP
ranks and nodes, and resuming mid-epoch are the folder path's, sample for sample. A
filesystem that serves large files well (a parallel or network filesystem, a mounted bucket)
then replaces 1.3 million small-file opens by a few hundred large files.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from ..runs import atomic_write, atomic_write_text
from .loading import DataError

__all__ = ["FORMAT", "MANIFEST", "ShardSamples", "pack_folders", "read_manifest", "write_shards"]

log = logging.getLogger(__name__)

FORMAT = "webdataset-tar/1"
MANIFEST = "shards.json"


def _index_path(root: Path, split: str) -> Path:
    return root / f"{split}.index.npy"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size, member.mtime, member.mode = len(data), 0, 0o644
    tar.addfile(member, io.BytesIO(data))


def _write_shard(handle: Any, dataset: Any, start: int, shard: int, shard_bytes: int, rows: List[Any]) -> int:
    """Samples from ``start`` on into one tar file until it holds ``shard_bytes``; returns the
    next sample's index. Appends (shard, offset, size, label) per sample to ``rows``."""
    index = start
    with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        while index < len(dataset) and (index == start or handle.tell() < shard_bytes):
            path, label = dataset.path(index), int(dataset.labels[index])
            key = f"{index:09d}"
            data = Path(path).read_bytes()
            _add(tar, f"{key}{Path(path).suffix.lower()}", data)
            # the bytes end where the file is now, padded to tar's 512-byte blocks
            rows.append((shard, handle.tell() - ((len(data) + 511) // 512) * 512, len(data), label))
            _add(tar, f"{key}.cls", str(label).encode())
            index += 1
    return index


def write_shards(
    splits: Dict[str, Any], classes: List[str], out: os.PathLike | str, shard_bytes: int = 256 << 20
) -> Dict[str, Any]:
    """Pack ``splits`` (name -> an ``ImageFolderDataset``, read in its order) into tar shards of
    about ``shard_bytes`` each under ``out``; returns the manifest.

    Every shard and index is written to a temporary file and renamed into place, and the
    manifest last: an interrupted pack leaves no manifest, so nothing reads half of it.
    """
    out = Path(out)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out} already holds packed shards ({MANIFEST}); choose an empty out= folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest: Dict[str, Any] = {"format": FORMAT, "classes": list(classes), "splits": {}}
    for split, dataset in splits.items():
        rows: List[Tuple[int, int, int, int]] = []
        shards: List[Dict[str, Any]] = []
        index = 0
        while index < len(dataset):
            name, first, shard = f"{split}-{len(shards):06d}.tar", index, len(shards)
            done: List[int] = []
            path = atomic_write(
                out / name,
                lambda handle: done.append(_write_shard(handle, dataset, first, shard, shard_bytes, rows)),  # noqa: B023
            )
            index = done[0]
            shards.append({"file": name, "bytes": path.stat().st_size, "samples": index - first})
        table = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
        atomic_write(_index_path(out, split), lambda handle: np.save(handle, table))  # noqa: B023
        manifest["splits"][split] = {"samples": len(table), "shards": shards}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(root: os.PathLike | str) -> Dict[str, Any]:
    """The manifest of a packed folder, with every shard checked to be present and complete."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"data.root={root} holds no {MANIFEST}: it is not a packed dataset (or its packing did not "
            "finish); pack one with crate-pack data.root=<class folders> out=<folder>"
        )
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
    except (ValueError, AttributeError) as err:
        raise DataError(f"{path} is not a crate-pack manifest ({err}); pack the dataset again") from None
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            file = root / shard["file"]
            size = file.stat().st_size if file.is_file() else None
            if size != shard["bytes"]:
                found = "missing" if size is None else f"{size} bytes"
                raise DataError(
                    f"shard {file} is {found}, expected {shard['bytes']} bytes (an incomplete copy?); "
                    f"copy it again from where {split} was packed, or pack the dataset again"
                )
        if not _index_path(root, split).is_file():
            raise DataError(f"{_index_path(root, split)} is missing; copy it with the shards or pack again")
    return manifest


class ShardSamples:
    """One split of a packed folder as (name, bytes) by sample index, read with ``os.pread``.

    Shards are opened lazily in each process (a DataLoader worker opens its own), so no file
    descriptor is shared across a fork.
    """

    def __init__(self, root: os.PathLike | str, split: str, manifest: Dict[str, Any]) -> None:
        self.root = Path(root)
        self.files = [shard["file"] for shard in manifest["splits"][split]["shards"]]
        index = _index_path(self.root, split)
        try:
            self.table = np.load(index, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(
                f"{index} is unreadable ({err}); copy it again or pack the dataset again"
            ) from None
        expected = manifest["splits"][split]["samples"]
        if self.table.ndim != 2 or self.table.shape[1] != 4 or len(self.table) != expected:
            raise DataError(f"{index} does not match {MANIFEST}; copy both again or pack the dataset again")
        self.labels = self.table[:, 3].copy()
        self._handles: Dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.table)

    def name(self, index: int) -> str:
        return f"{self.root / self.files[int(self.table[index, 0])]}:{index:09d}"

    def read(self, index: int) -> bytes:
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        shard, offset, size, _ = (int(v) for v in self.table[index])
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = os.open(self.root / self.files[shard], os.O_RDONLY)
        data = os.pread(handle, size, offset)
        if len(data) != size:
            raise OSError(f"read {len(data)} of {size} bytes (the shard is shorter than its index says)")
        return data

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_handles": {}, "_pid": -1}


def pack_folders(root: os.PathLike | str, out: os.PathLike | str, shard_bytes: int) -> Dict[str, Any]:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` (the ImageNet layout) into shards."""
    from .imagenet import ImageFolderDataset, ImageNetDataModule

    classes = ImageNetDataModule.class_folders(str(root))
    class_to_idx = {name: i for i, name in enumerate(classes)}
    splits = {
        split: ImageFolderDataset(os.path.join(str(root), split), class_to_idx, read=_unused)
        for split in ("train", "val")
    }
    return write_shards(splits, classes, out, shard_bytes)


def _unused(path: str) -> Any:  # packing copies bytes; it never decodes
    raise AssertionError(path)
