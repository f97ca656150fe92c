"""Tests for the procedural shapes dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crate_lit.data.shapes as shapes
from crate_lit.data.shapes import (
    CLASS_NAMES,
    DEFAULT_SCALE,
    GENERATOR_VERSION,
    SPLIT_IDS,
    ShapesDataModule,
    ShapesDataset,
    _draw_words,
    _Poses,
    _rasterise,
    _render_words,
    _words_per_image,
    render_batch,
    render_shape_image,
)

INDICES = [0, 1, 7, 13, 29, 42, 63]


def _samples(ds: ShapesDataset, indices: list[int]) -> dict[int, tuple]:
    return {i: ds.render(i) for i in indices}


def test_class_names() -> None:
    assert len(CLASS_NAMES) >= 10
    assert len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    assert ShapesDataset(size=4, num_classes=4).classes == CLASS_NAMES[:4]


def test_deterministic_across_instances_and_access_order() -> None:
    a = ShapesDataset(split="train", size=64, seed=3, return_mask=True)
    b = ShapesDataset(split="train", size=64, seed=3, return_mask=True)
    forward = _samples(a, INDICES)
    backward = _samples(b, INDICES[::-1])
    for i in INDICES:
        img_a, lab_a, mask_a = forward[i]
        img_b, lab_b, mask_b = backward[i]
        np.testing.assert_array_equal(img_a, img_b)
        np.testing.assert_array_equal(mask_a, mask_b)
        assert lab_a == lab_b
    # The cached, materialised path must agree with rendering a single index.
    images, labels, masks = b.materialize()
    for i in INDICES:
        img, lab, mask = forward[i]
        np.testing.assert_array_equal(images[i].permute(1, 2, 0).numpy(), img)
        np.testing.assert_array_equal(masks[i].numpy(), mask)
        assert int(labels[i]) == lab
        x, y, m = a[i]
        assert torch.equal(x, images[i].float() / 255.0)
        assert y == lab
        assert torch.equal(m, masks[i])


@pytest.mark.parametrize("other", [{"seed": 4}, {"split": "val"}, {"split": "test"}])
def test_different_seed_or_split_differs(other: dict) -> None:
    base = ShapesDataset(split="train", size=16, seed=3)
    kwargs = {"split": "train", "size": 16, "seed": 3} | other
    alt = ShapesDataset(**kwargs)
    for i in range(5):
        assert not np.array_equal(base.render(i)[0], alt.render(i)[0])


def test_different_indices_differ() -> None:
    ds = ShapesDataset(size=20)
    assert not np.array_equal(ds.render(0)[0], ds.render(10)[0])  # same class


@pytest.mark.parametrize("image_size", [16, 32, 48, 64])
def test_mask_is_exactly_the_painted_shape(image_size: int) -> None:
    n = 3 * len(CLASS_NAMES)
    indices = np.arange(n)
    words = _draw_words(11, 0, indices, image_size)
    images, masks, backgrounds = _render_words(words, indices % len(CLASS_NAMES), image_size, DEFAULT_SCALE)
    # The batch path that render_batch takes, channels last.
    public, _, public_masks = render_batch(11, 0, indices, image_size, len(CLASS_NAMES))
    np.testing.assert_array_equal(public, images.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(public_masks, masks)
    for image, mask, background in zip(public, masks, backgrounds.transpose(0, 2, 3, 1), strict=True):
        assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
        assert mask.shape == (image_size, image_size) and mask.dtype == np.bool_
        assert 0 < mask.sum() < mask.size
        colours = np.unique(image[mask], axis=0)
        assert len(colours) == 1, "all shape pixels must have exactly one colour"
        colour = colours[0]
        # Painting that colour into exactly the mask pixels reproduces the image, and the
        # background outside the mask is untouched.
        repainted = background.copy()
        repainted[mask] = colour
        np.testing.assert_array_equal(repainted, image)
        # The shape colour must stand out: the outside neighbours of the mask are not that
        # colour (neither all of them nor, realistically, any but a stray few).
        ring = _outer_border(mask)
        assert ring.any()
        same = np.all(image[ring] == colour, axis=-1)
        assert same.mean() < 0.05
        # Minimum contrast against the background it covers, and a bright colour.
        dist = np.linalg.norm(background[mask].astype(float) - colour.astype(float), axis=-1)
        assert np.median(dist) > 40
        assert colour.max() >= 200


def test_background_is_dark_and_cluttered() -> None:
    """Figure and ground differ in kind: darkish, textured backgrounds under bright shapes."""
    images, _, masks = render_batch(0, 0, np.arange(64), 32, 10)
    background = images[~masks].astype(float)
    assert 30 < background.mean() < 110
    # Noise and distractors: no background is flat, and neighbouring pixels differ by little
    # more than the noise on average.
    for image, mask in zip(images.astype(int), masks, strict=True):
        steps = np.abs(np.diff(image, axis=1))[~(mask[:, 1:] | mask[:, :-1])]
        assert 0.5 < steps.mean() < 6


def _outer_border(mask: np.ndarray) -> np.ndarray:
    """Pixels outside ``mask`` that are 4-neighbours of a mask pixel."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def test_render_shape_image_uses_the_generators_next_draws() -> None:
    rng = np.random.default_rng(5)
    image, mask = render_shape_image(rng, 3, 32)
    words = np.random.default_rng(5).bit_generator.random_raw(_words_per_image(32)).reshape(1, -1)
    images, masks, _ = _render_words(words, np.array([3]), 32, DEFAULT_SCALE)
    np.testing.assert_array_equal(image, images[0].transpose(1, 2, 0))
    np.testing.assert_array_equal(mask, masks[0])
    # The generator moved on: the next call draws another image.
    assert not np.array_equal(render_shape_image(rng, 3, 32)[0], image)


def _local_mask(name: str, size: int, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shape ``name`` unrotated, centred on a size x size grid, and the local coordinates
    (u, v) of the grid's pixel centres."""
    one = np.ones(1)
    pose = _Poses(one * size / 2, one * size / 2, one * radius, one, 0 * one)
    mask = _rasterise(np.array([CLASS_NAMES.index(name)]), pose, size)[0]
    c = (np.arange(size) + 0.5 - size / 2) / radius
    u, v = np.meshgrid(c, c)
    return mask, u, v


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_shapes_fit_unit_disk(name: str) -> None:
    # Positions are sampled assuming every shape lies in its unit disk; this is what keeps the
    # shape fully inside the image.
    inside, u, v = _local_mask(name, 600, 200.0)
    assert inside.mean() > 0.05
    assert np.all(u[inside] ** 2 + v[inside] ** 2 <= 1.0 + 1e-9)


def test_shapes_are_distinct_at_high_resolution() -> None:
    # Same pose for every class: no two classes may rasterise to the same mask.
    masks = [_local_mask(name, 64, 32.0)[0] for name in CLASS_NAMES]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] != masks[j]).mean() > 0.03, (CLASS_NAMES[i], CLASS_NAMES[j])


def test_mask_stays_inside_image() -> None:
    ds = ShapesDataset(size=60, image_size=16, num_classes=len(CLASS_NAMES), seed=1)
    _, _, masks = ds.materialize()
    area = masks.flatten(1).sum(1)
    assert torch.all(area > 0)
    assert torch.all(area < 16 * 16 * 0.7)


@pytest.mark.parametrize("num_classes", [2, 10, len(CLASS_NAMES)])
def test_labels_balanced_and_complete(num_classes: int) -> None:
    size = 5 * num_classes + 3
    ds = ShapesDataset(size=size, num_classes=num_classes)
    labels = torch.tensor([ds.label_of(i) for i in range(size)])
    assert labels.min() >= 0 and labels.max() < num_classes
    counts = torch.bincount(labels, minlength=num_classes)
    assert torch.all(counts > 0)
    assert counts.max() - counts.min() <= 1


def test_materialized_labels_match_getitem() -> None:
    ds = ShapesDataset(size=25, num_classes=10)
    _, labels, _ = ds.materialize()
    assert torch.equal(labels, torch.tensor([ds[i][1] for i in range(25)]))
    assert set(labels.tolist()) == set(range(10))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": len(CLASS_NAMES) + 1}, r"num_classes must be in \[2, "),
        ({"num_classes": 1}, r"num_classes must be in \[2, "),
        ({"num_classes": 0}, r"num_classes must be in \[2, "),
        ({"image_size": 15}, "image_size must be >= 16"),
        ({"split": "training"}, r"split must be one of \('train', 'val', 'test'\)"),
        ({"size": 0}, "size must be >= 1"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"shape_scale": (0.9, 0.5)}, r"shape_scale must be \[min, max\] with 0 < min <= max <= 1"),
        ({"shape_scale": (0.0, 0.5)}, "shape_scale must be"),
        ({"shape_scale": (0.5, 1.2)}, "shape_scale must be"),
        ({"shape_scale": 0.5}, "shape_scale must be"),
        ({"shape_scale": (0.5,)}, "shape_scale must be"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ShapesDataset(**kwargs)


def test_bad_label_or_size_in_render() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="label must be in"):
        render_shape_image(rng, len(CLASS_NAMES), 32)
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        render_shape_image(rng, 0, 8)


def test_index_errors() -> None:
    ds = ShapesDataset(size=4)
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(IndexError):
        ds[-1]
    with pytest.raises(IndexError):
        ds.render(10)


def test_materialize_shapes_dtypes_and_cache() -> None:
    ds = ShapesDataset(size=12, image_size=32)
    images, labels, masks = ds.materialize()
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (12,) and labels.dtype == torch.int64
    assert masks.shape == (12, 32, 32) and masks.dtype == torch.bool
    again = ds.materialize()
    assert again[0] is images and again[1] is labels and again[2] is masks


@pytest.mark.parametrize("image_size", [16, 32, 48, 64])
def test_getitem(image_size: int) -> None:
    ds = ShapesDataset(size=6, image_size=image_size, num_classes=3)
    assert len(ds) == 6
    x, y = ds[4]
    assert x.shape == (3, image_size, image_size) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert isinstance(y, int) and y == 1

    ds_m = ShapesDataset(size=6, image_size=image_size, num_classes=3, return_mask=True)
    x2, y2, m = ds_m[4]
    assert torch.equal(x, x2) and y == y2
    assert m.shape == (image_size, image_size) and m.dtype == torch.bool
    # Every masked pixel has the same colour in the float image too.
    pix = x2.permute(1, 2, 0)[m]
    assert torch.all(pix == pix[0])


def test_transform_applied_to_float_image() -> None:
    seen = []

    def transform(img: torch.Tensor) -> torch.Tensor:
        seen.append(img.dtype)
        return img * 2.0

    plain = ShapesDataset(size=3)
    ds = ShapesDataset(size=3, transform=transform)
    x, _ = ds[1]
    assert seen == [torch.float32]
    assert torch.equal(x, plain[1][0] * 2.0)


def test_dataloader_batches() -> None:
    ds = ShapesDataset(size=10, num_classes=5, return_mask=True)
    x, y, m = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 1, 2, 3] and m.shape == (4, 32, 32)


def test_shape_scale_sets_the_diameter() -> None:
    """A circle is the easiest known answer: at scale (s, s) its area is pi (s S / 2)^2, and a
    narrow range keeps every shape inside a disk of that diameter."""
    size = 48
    for s in (0.3, 0.6, 0.9):
        ds = ShapesDataset(size=40, image_size=size, num_classes=10, shape_scale=(s, s), return_mask=True)
        _, labels, masks = ds.materialize()
        circles = masks[labels == 0]
        expected = np.pi * (s * size / 2) ** 2
        assert np.allclose(circles.sum((1, 2)).numpy(), expected, rtol=0.08)
        for m in masks:
            ys, xs = np.nonzero(m.numpy())
            assert ys.max() - ys.min() + 1 <= s * size + 1 and xs.max() - xs.min() + 1 <= s * size + 1


def test_datamodule_rejects_a_bad_shape_scale() -> None:
    with pytest.raises(ValueError, match=r"shape_scale must be \[min, max\]"):
        ShapesDataModule(shape_scale=[0.8, 0.4])


def test_generator_version() -> None:
    assert isinstance(GENERATOR_VERSION, int) and GENERATOR_VERSION >= 2


def test_each_image_has_its_own_block_of_the_split_stream() -> None:
    """Image i is rendered from raw draws [i k, (i + 1) k) of the PCG64 stream of (seed, split),
    whichever images are drawn with it."""
    k = _words_per_image(16)
    stream = np.random.PCG64(np.random.SeedSequence([7, 2])).random_raw(6 * k).reshape(6, k)
    np.testing.assert_array_equal(_draw_words(7, 2, np.array([5, 1, 2, 3, 5]), 16), stream[[5, 1, 2, 3, 5]])


@pytest.mark.parametrize(("image_size", "scale"), [(16, DEFAULT_SCALE), (32, (0.4, 0.7)), (48, (0.2, 0.3))])
def test_render_batch_does_not_depend_on_batching(
    image_size: int, scale: tuple[float, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    n, num_classes = 40, len(CLASS_NAMES)
    full = render_batch(3, 1, np.arange(n), image_size, num_classes, scale)
    images, labels, masks = full
    assert images.shape == (n, image_size, image_size, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [i % num_classes for i in range(n)]
    assert masks.shape == (n, image_size, image_size) and masks.dtype == np.bool_

    def check(indices: np.ndarray) -> None:
        part = render_batch(3, 1, indices, image_size, num_classes, scale)
        for got, want in zip(part, full, strict=True):
            np.testing.assert_array_equal(got, want[indices])

    order = np.random.default_rng(0).permutation(n)
    for indices in (np.arange(7), np.arange(7, 29), np.arange(29, n), order, np.arange(n)[::-1], [17, 17, 3]):
        check(np.asarray(indices))
    for i in (0, 13, n - 1):
        check(np.array([i]))
    # Internal batches of 1 and of 3 images: other array shapes, same pixels.
    for batch in (1, 3):
        monkeypatch.setattr(shapes, "_BATCH_PIXELS", batch * image_size * image_size)
        check(order)


def test_materialize_equals_render_of_each_index() -> None:
    ds = ShapesDataset(split="test", size=30, image_size=24, num_classes=7, seed=5, shape_scale=(0.3, 0.8))
    images, labels, masks = ds.materialize()
    assert images.is_contiguous()
    for i in range(len(ds)):
        image, label, mask = ds.render(i)
        np.testing.assert_array_equal(images[i].permute(1, 2, 0).numpy(), image)
        np.testing.assert_array_equal(masks[i].numpy(), mask)
        assert int(labels[i]) == label == i % 7
    # The dataset is render_batch over its split.
    batch = render_batch(5, SPLIT_IDS["test"], np.arange(30), 24, 7, (0.3, 0.8))
    np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), batch[0])


def test_render_batch_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        render_batch(0, 0, [0], 8, 10)
    with pytest.raises(ValueError, match=r"num_classes must be in \[2, "):
        render_batch(0, 0, [0], 32, 1)
    with pytest.raises(ValueError, match="shape_scale must be"):
        render_batch(0, 0, [0], 32, 10, (0.5, 2.0))
    with pytest.raises(ValueError, match="must be >= 0"):
        render_batch(0, 0, [3, -1], 32, 10)
