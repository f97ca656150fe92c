"""The input pipeline's device side and its determinism: batch transforms against torchvision's
per-image ones, per-image randomness independent of workers, batches and DDP ranks, the shapes
cache, and the throughput figures a run logs."""

from __future__ import annotations

import logging
import math
import os
import time
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T

from crate_lit.callbacks import ThroughputLogger
from crate_lit.data.augment import (
    flip_and_translate,
    key_uniform,
    random_erasing,
    random_resized_crop_boxes,
    resized_crops,
)
from crate_lit.data.cifar import CIFARDataModule
from crate_lit.data.imagenet import ImageNetDataModule
from crate_lit.data.loading import EpochSampler
from crate_lit.data.shapes import ShapesDataModule
from formats import LOADER

SHAPES = {"image_size": 32, "train_size": 48, "val_size": 16, "batch_size": 8} | LOADER


def test_key_uniform_is_uniform_and_independent_of_the_batch() -> None:
    keys = torch.arange(50_000, dtype=torch.int64) * 7_919 + 12_345
    u = key_uniform(keys, stream=0, count=4)
    assert u.dtype == torch.float32 and 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.002
    assert abs(float(torch.corrcoef(u.T)[0, 1])) < 0.02  # positions are not correlated
    assert abs(float(torch.corrcoef(torch.stack([u[:, 0], key_uniform(keys, 1)[:, 0]]))[0, 1])) < 0.02
    # a pure function of the key: the same numbers in any batch, in any order
    order = torch.randperm(len(keys))
    assert torch.equal(key_uniform(keys[order], 0, 4), u[order])
    assert torch.equal(key_uniform(keys[:3], 0, 4), u[:3])


@pytest.mark.parametrize("flip", [False, True])
def test_flip_and_translate_is_torchvisions_flip_then_reflect_padded_crop(flip: bool) -> None:
    image = torch.randint(0, 256, (1, 3, 16, 12), dtype=torch.uint8)
    pad = 3
    source = image.flip(-1) if flip else image
    padded = F.pad(source.float(), (pad,) * 4, mode="reflect")
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            out = flip_and_translate(image, torch.tensor([flip]), torch.tensor([dy]), torch.tensor([dx]))
            expected = padded[:, :, pad + dy : pad + dy + 16, pad + dx : pad + dx + 12]
            assert out.dtype == torch.uint8 and torch.equal(out.float(), expected), (dy, dx)


def test_random_resized_crop_boxes_follow_torchvisions_rules() -> None:
    n = 20_000
    keys = torch.arange(n, dtype=torch.int64)
    boxes = random_resized_crop_boxes(keys, torch.full((n,), 375), torch.full((n,), 500))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 375).all() and (left + w <= 500).all()
    share = (h * w).double() / (375 * 500)
    assert 0.075 < float(share.min()) and float(share.max()) <= 1.0
    aspect = w.double() / h.double()
    assert float(aspect.min()) > 3 / 4 - 0.02 and float(aspect.max()) < 4 / 3 + 0.02
    # torchvision's crop sizes for the same image size: same mean area share, within noise
    torch.manual_seed(0)
    reference = [
        T.RandomResizedCrop.get_params(torch.empty(3, 375, 500), (0.08, 1.0), (3 / 4, 4 / 3))
        for _ in range(n)
    ]
    ref_share = torch.tensor([r[2] * r[3] / (375 * 500) for r in reference]).double()
    assert abs(float(share.mean() - ref_share.mean())) < 0.01
    # no fitting draw (a 10 x 1000 strip): the centre crop clamped to the largest ratio
    strip = random_resized_crop_boxes(keys[:4], torch.full((4,), 10), torch.full((4,), 1000))
    assert strip.tolist() == [[0, 493, 10, 13]] * 4


def test_resized_crops_match_crop_then_resize_inside_the_image() -> None:
    image = torch.rand(2, 3, 32, 32) * 255
    boxes = torch.tensor([[0, 0, 32, 32], [4, 8, 16, 16]])
    same = resized_crops(image, boxes, 32)
    assert torch.allclose(same[0], image[0], atol=1e-3)
    half = resized_crops(image, boxes, 16, flip=torch.tensor([False, True]))
    assert torch.allclose(half[1], image[1, :, 4:20, 8:24].flip(-1), atol=1e-3)
    # upsampling a crop: bilinear, as F.interpolate does away from the crop's edge
    up = resized_crops(image[1:], boxes[1:], 64)
    reference = F.interpolate(image[1:, :, 4:20, 8:24], size=64, mode="bilinear", align_corners=False)
    assert torch.allclose(up[..., 4:-4, 4:-4], reference[..., 4:-4, 4:-4], atol=1e-3)


def test_random_erasing_rate_and_area() -> None:
    keys = torch.arange(4000, dtype=torch.int64)
    erased = random_erasing(torch.ones(4000, 3, 32, 32), keys, p=0.25)
    hit = (erased == 0).flatten(1)
    share = hit.any(1).float().mean()
    assert abs(float(share) - 0.25) < 0.03
    areas = hit.float().mean(1)[hit.any(1)]
    # scale (0.02, 0.33), with the sides rounded to whole pixels as torchvision rounds them
    assert 0.015 <= float(areas.min()) and float(areas.max()) <= 0.36
    assert torch.equal((erased == 0).all(1), (erased == 0).any(1))  # whole pixels, every channel
    assert torch.equal(random_erasing(torch.ones(8, 3, 32, 32), keys[:8], p=0.0), torch.ones(8, 3, 32, 32))


def _train_inputs(dm, **loader) -> dict:
    """Per image index, the model input a training epoch gives it."""
    dm.hparams.update(loader)
    dm.setup("fit")
    seen = {}
    for images, _labels, keys in dm.train_dataloader():
        inputs = dm.train_batch(images, keys)
        for key, x in zip(keys.tolist(), inputs, strict=True):
            seen[key] = x
    return seen


@pytest.mark.parametrize("kind", ["shapes", "cifar", "imagenet"])
def test_augmentation_is_the_same_for_any_worker_count_and_ddp_rank(kind, request, tmp_path) -> None:
    def build():
        if kind == "shapes":
            return ShapesDataModule(**SHAPES, cache_dir=str(tmp_path / "cache"))
        if kind == "cifar":
            root = request.getfixturevalue("cifar10_root")
            return CIFARDataModule(str(root), image_size=48, batch_size=2, random_erasing=0.5, **LOADER)
        root = request.getfixturevalue("imagenet_root")
        return ImageNetDataModule(
            str(root), image_size=32, eval_resize=36, num_classes=3, batch_size=2, **LOADER,
            randaugment=[2, 9], random_erasing=0.5,
        )  # fmt: skip

    one = _train_inputs(build())
    two = _train_inputs(build(), num_workers=2)
    assert one.keys() == two.keys() and len(one) >= 4
    for key in one:
        assert torch.equal(one[key], two[key])
    # a DDP rank's loader: its share of the images, each with the augmentation it has in one process
    dm = build()
    dm.setup("fit")
    loader = dm.train_dataloader()
    sampler = EpochSampler(dm.train_set, num_replicas=2, rank=1, shuffle=True, seed=0)
    rank_loader = torch.utils.data.DataLoader(
        loader.dataset, batch_size=2, sampler=sampler, collate_fn=loader.collate_fn
    )
    for images, _, keys in rank_loader:
        for key, x in zip(keys.tolist(), dm.train_batch(images, keys), strict=True):
            assert torch.equal(x, one[key])
    # and the augmentation is random: the epoch's inputs are not the evaluation view's
    plain = dm.train_images_for_eval()
    evaluation = {dm.eval_batch(plain[i][0][None])[0].sum().item() for i in range(len(plain))}
    assert {x.sum().item() for x in one.values()} != evaluation


def test_imagenet_randaugment_and_erasing_follow_the_seed(imagenet_root, monkeypatch) -> None:
    def inputs(**options) -> dict:
        return _train_inputs(
            ImageNetDataModule(
                str(imagenet_root), image_size=32, eval_resize=36, num_classes=3, batch_size=2, **LOADER,
                **options,
            )
        )  # fmt: skip

    plain, augmented, again = inputs(), inputs(randaugment=[2, 9]), inputs(randaugment=[2, 9])
    assert plain.keys() == augmented.keys() == again.keys() and len(plain) == 6
    assert all(torch.equal(augmented[k], again[k]) for k in plain)  # the same seed: the same images
    assert not any(torch.equal(augmented[k], plain[k]) for k in plain)
    # erasing: a rectangle of zeros (every channel) in each image, which the plain inputs have not
    erased = inputs(random_erasing=1.0)
    assert all(bool((erased[k] == 0).all(0).any()) for k in plain)
    assert not any(bool((plain[k] == 0).all(0).any()) for k in plain)
    # another seed: other keys, other augmentations of the same images
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    other = inputs(randaugment=[2, 9])
    assert not set(other) & set(augmented)
    totals = [sorted(x.sum().item() for x in run.values()) for run in (other, augmented)]
    assert totals[0] != totals[1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"randaugment": [2]}, "data.randaugment is null (off) or [num_ops, magnitude]"),
        ({"randaugment": [2, 11]}, "magnitude 0-10 (timm's scale: [2, 9] for rand-m9), got [2, 11]"),
        ({"randaugment": True}, "got True"),
        ({"randaugment": [2, 9], "decode": "gpu"}, "use data.decode=cpu with it, or data.randaugment=null"),
        ({"random_erasing": 1.5}, "data.random_erasing is a probability in [0, 1], got 1.5"),
        ({"random_erasing": "0.25"}, "got '0.25'"),
    ],
)
def test_imagenet_augmentation_values_that_cannot_work(imagenet_root, options, message) -> None:
    with pytest.raises(ValueError) as error:
        ImageNetDataModule(str(imagenet_root), image_size=32, num_classes=3, **options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_device_step_normalises_with_the_modules_own_statistics(imagenet_root) -> None:
    dm = ImageNetDataModule(
        str(imagenet_root), image_size=32, eval_resize=36, num_classes=3, batch_size=2, **LOADER
    )
    white = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    expected = (1 - torch.tensor(dm.mean)) / torch.tensor(dm.std)
    assert torch.allclose(dm.eval_batch(white)[0, :, 0, 0], expected, atol=1e-6)
    shapes = ShapesDataModule(**SHAPES, cache_dir=None)
    assert torch.allclose(shapes.eval_batch(white), torch.ones(1, 3, 4, 4))  # mean 0.5, std 0.5


def test_shapes_cache_is_written_once_and_never_reused_for_other_settings(tmp_path, caplog) -> None:
    cache = tmp_path / "cache"
    first = ShapesDataModule(**SHAPES, cache_dir=str(cache))
    first.prepare_data()
    first.setup("fit")
    files = sorted(cache.iterdir())
    assert [f.name.split("-")[1] for f in files] == ["train", "val"]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    second = ShapesDataModule(**SHAPES, cache_dir=str(cache))
    second.prepare_data()
    second.setup("fit")
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # read, not written again
    assert torch.equal(second.train_set.images, first.train_set.images)
    assert torch.equal(second.val_set.masks, first.val_set.masks)
    # other settings: other files
    other = ShapesDataModule(**(SHAPES | {"seed": 1}), cache_dir=str(cache))
    other.prepare_data()
    assert len(list(cache.iterdir())) == 4
    # a file whose content is another setting's is ignored (with one line), and left as it is
    path = first.cache_path("val", SHAPES["val_size"])
    foreign = other.cache_path("val", SHAPES["val_size"])
    path.write_bytes(foreign.read_bytes())
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING):
        third = ShapesDataModule(**SHAPES, cache_dir=str(cache))
        third.prepare_data()
        third.setup("validate")
    assert "written for other settings" in caplog.text
    assert torch.equal(third.val_set.images, first.val_set.images) and path.read_bytes() == before
    # a truncated one too
    path.write_bytes(before[:100])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fourth = ShapesDataModule(**SHAPES, cache_dir=str(cache))
        fourth.setup("validate")
    assert "unreadable" in caplog.text and torch.equal(fourth.val_set.images, first.val_set.images)


def test_an_unwritable_cache_folder_falls_back_to_memory_with_one_warning(tmp_path, caplog) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING):
        dm = ShapesDataModule(**SHAPES, cache_dir=str(blocked / "cache"))
        dm.prepare_data()
        dm.setup("fit")
    warnings = [r for r in caplog.records if "cannot write the shapes cache" in r.getMessage()]
    assert len(warnings) == 1 and "data.cache_dir" in warnings[0].getMessage()
    assert len(dm.train_set) == SHAPES["train_size"] and blocked.read_text().startswith("a file")


class _Sleepy(torch.utils.data.Dataset):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int):
        time.sleep(self.delay)
        return torch.zeros(4), 0


class _Model(L.LightningModule):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.delay = delay

    def training_step(self, batch, batch_idx):
        time.sleep(self.delay)
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("data_delay", "step_delay", "data_bound"), [(0.01, 0.0, True), (0.0, 0.04, False)])
def test_throughput_logger_tells_a_data_bound_run_from_a_model_bound_one(
    tmp_path, data_delay, step_delay, data_bound
):
    trainer = L.Trainer(
        max_epochs=1, callbacks=[ThroughputLogger()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(_Sleepy(data_delay), batch_size=8)
    trainer.fit(_Model(step_delay), loader)
    share = float(trainer.callback_metrics["perf/data_wait_share"])
    rate = float(trainer.callback_metrics["perf/images_per_sec"])
    # 8 images a batch: 0.08 s of loading per batch, or 0.04 s of step
    assert (share > 0.8) if data_bound else (share < 0.2)
    assert rate == pytest.approx(8 / (8 * data_delay + step_delay), rel=0.5)


def test_crate_bench_data_measures_each_loader_on_the_same_files(imagenet_root) -> None:
    from crate_lit.benchmarks import bench_data

    overrides = [
        "data=imagenet", f"data.root={imagenet_root}", "data.num_classes=3", "data.image_size=32",
        "data.eval_resize=36", "data.batch_size=2", "data.num_workers=0", "model=crate_micro",
    ]  # fmt: skip
    result = bench_data(overrides, batches=1, warmup=1, baseline=True, device="cpu", rounds=2)
    rates = ["loader_images_per_s", "workers_images_per_s", "torchvision_images_per_s", "model_images_per_s"]
    assert all(math.isfinite(result[k]) and result[k] > 0 for k in rates)
    assert (result["data"], result["batch_size"], result["num_workers"], result["rounds"]) == (
        "imagenet",
        2,
        0,
        2,
    )
    assert result["bound_by"] == (
        "data" if result["loader_images_per_s"] < result["model_images_per_s"] else "model"
    )
    with pytest.raises(ValueError, match="use it with data=imagenet"):
        bench_data(["data=shapes"], batches=1, warmup=1, baseline=True, device="cpu")


def test_more_workers_than_cores_is_said_once_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    cores = len(os.sched_getaffinity(0))
    shapes = ShapesDataModule(**{**SHAPES, "num_workers": cores + 1}, cache_dir=None)
    shapes.setup("fit")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        for _ in range(2):  # two epochs of both loaders: torch would warn at each start
            next(iter(shapes.train_dataloader()))
            next(iter(shapes.val_dataloader()))
    ours = [r.getMessage() for r in caplog.records if "data.num_workers" in r.getMessage()]
    assert ours == [
        f"data.num_workers={cores + 1} is more than the {cores} CPU cores this process may use: the extra "
        f"workers wait for a core and take memory; set data.num_workers={cores} or fewer"
    ]
    assert not [w for w in caught if "worker processes in total" in str(w.message)]
