"""crate-pack and data=imagenet_shards: the ImageNet fixture packed into WebDataset tar shards
by the real command, read back like the folders, trained on in one process and over DDP."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from commands import QUICK, crate_train, one_line_error, run_command, summary_of
from crate_lit.data.imagenet import ImageNetDataModule, ImageNetShardsDataModule
from crate_lit.data.loading import DataError
from crate_lit.data.shards import pack_folders
from formats import LOADER

ARGS = {"image_size": 32, "eval_resize": 36, "num_classes": 3, "batch_size": 2} | LOADER


@pytest.fixture
def packed(imagenet_root: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    pack_folders(imagenet_root, out, shard_bytes=4096)  # small shards: several per split
    return out


def test_crate_pack_writes_webdataset_shards_that_tar_reads(imagenet_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    proc = run_command(
        "crate-pack", f"data.root={imagenet_root}", f"out={out}", "shard_mib=0.004", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "shards.json").read_text())
    assert manifest["classes"] == sorted(p.name for p in (imagenet_root / "train").iterdir())
    train = manifest["splits"]["train"]
    assert train["samples"] == 6 and len(train["shards"]) > 1
    # WebDataset's layout: members <key>.<ext> and <key>.cls, the image bytes unchanged
    folders = ImageNetDataModule(str(imagenet_root), **ARGS)
    folders.setup("fit")
    seen = 0
    for shard in train["shards"]:
        with tarfile.open(out / shard["file"]) as tar:
            names = tar.getnames()
            assert len(names) == 2 * shard["samples"]
            for image_name, cls_name in zip(names[::2], names[1::2], strict=True):
                key = int(image_name.split(".")[0])
                assert cls_name == f"{key:09d}.cls"
                assert tar.extractfile(image_name).read() == Path(folders.train_set.path(key)).read_bytes()
                assert int(tar.extractfile(cls_name).read()) == int(folders.train_set.labels[key])
                seen += 1
    assert seen == 6
    # packing into a folder that holds shards is refused, and the shards stay as they were
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = run_command("crate-pack", f"data.root={imagenet_root}", f"out={out}", cwd=tmp_path)
    assert again.returncode == 2 and "already holds packed shards" in one_line_error(again, "crate-pack")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_shards_give_the_batches_the_folders_give(imagenet_root: Path, packed: Path) -> None:
    """Same images, order, labels and random crops: the shards replace the folders sample for sample."""
    folders = ImageNetDataModule(str(imagenet_root), **ARGS)
    shards = ImageNetShardsDataModule(str(packed), **ARGS)
    for dm in (folders, shards):
        dm.setup("fit")
    assert shards.classes == folders.classes
    for a, b in zip(folders.val_dataloader(), shards.val_dataloader(), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(folders.train_dataloader(), shards.train_dataloader(), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_an_incomplete_or_missing_shard_is_named(imagenet_root: Path, packed: Path) -> None:
    manifest = json.loads((packed / "shards.json").read_text())
    shard = packed / manifest["splits"]["train"]["shards"][1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"shard {shard} is {len(data) // 2} bytes, expected {len(data)}"):
        ImageNetShardsDataModule(str(packed), **ARGS)
    shard.unlink()
    with pytest.raises(DataError, match="is missing"):
        ImageNetShardsDataModule(str(packed), **ARGS)
    with pytest.raises(FileNotFoundError, match="not a packed dataset"):
        ImageNetShardsDataModule(str(imagenet_root), **ARGS)


def test_a_corrupt_image_inside_a_shard_names_shard_and_key(imagenet_root: Path, packed: Path) -> None:
    dm = ImageNetShardsDataModule(str(packed), **ARGS)
    dm.setup("fit")
    shard_id, offset, size, _ = (int(v) for v in dm.train_set.samples.table[0])
    path = packed / dm.train_set.samples.files[shard_id]
    with open(path, "r+b") as handle:  # same size: only the image's bytes are garbage
        handle.seek(offset)
        handle.write(b"\0" * size)
    with pytest.raises(DataError, match=f"cannot read image {path}:000000000"):
        dm.train_set[0]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["default", "ddp_sim"])
def test_training_streams_the_shards_in_one_process_and_over_ddp(
    tmp_path: Path, packed: Path, trainer: str
) -> None:
    no_model = [a for a in QUICK if not a.startswith(("model=", "data."))]
    proc = crate_train(
        "model=crate_micro", "data=imagenet_shards", f"data.root={packed}", "data.num_classes=3",
        "data.image_size=32", "data.eval_resize=36", "data.batch_size=2", "data.num_workers=0",
        f"trainer={trainer}", *no_model, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(tmp_path / "run")
    # 6 training images, global batch 2: 3 steps an epoch, however many processes share them
    assert summary["global_step"] == 2 * 3
    assert 0.0 <= summary["metrics"]["val/acc1"] <= 1.0
