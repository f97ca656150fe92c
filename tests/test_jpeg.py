"""Tests for the uint8 decode + crop + resize functions (crate_lit.data.jpeg).

Every image is written here with PIL into a temporary folder: smooth "photo-like" content (sines
plus noise) as JPEG at quality 90, plus grayscale and CMYK JPEGs and palette and RGBA PNGs.
"""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageFile, JpegImagePlugin

from crate_lit.data.jpeg import (
    center_crop_box,
    decode_resized_crops,
    load_crop,
    random_resized_crop_box,
    read_jpeg_with_box,
)

# torchvision 0.29 deprecates its JPEG decoder in favour of TorchCodec (not installed here).
decode_warning = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _photo(width: int, height: int, seed: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        127 + 90 * np.sin(x / 37 + c) * np.cos(y / 53 - c) + 35 * np.sin((x + y) / 11 + 2 * c)
        for c in range(3)
    ]
    pixels = np.stack(channels, -1) + np.random.default_rng(seed).normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("jpeg")
    out = {name: d / f"{name}.{ext}" for name, ext in [
        ("wide", "jpg"), ("tall", "jpg"), ("big", "jpg"), ("gray", "jpg"), ("cmyk", "jpg"),
        ("palette", "png"), ("rgba", "png"),
    ]}  # fmt: skip
    _photo(500, 375, 0).save(out["wide"], quality=90)
    _photo(375, 500, 1).save(out["tall"], quality=90)
    _photo(1800, 1350, 2).save(out["big"], quality=90)
    _photo(500, 375, 3).convert("L").save(out["gray"], quality=90)
    _photo(500, 375, 4).convert("CMYK").save(out["cmyk"], quality=90)
    _photo(320, 240, 5).convert("P", palette=Image.Palette.ADAPTIVE).save(out["palette"])
    rgba = _photo(240, 320, 6).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(out["rgba"])
    return out


def _reference(path: Path, box: tuple[float, float, float, float], size: int) -> torch.Tensor:
    """Plain full decode, convert to RGB, one PIL resize of the (left, top, w, h) box."""
    left, top, w, h = box
    with Image.open(path) as img:
        out = img.convert("RGB").resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def _full(width: int, height: int) -> tuple[int, int, int, int]:
    return 0, 0, width, height


@pytest.fixture
def draft_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records the decoded size after every JPEG draft() call."""
    sizes: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return sizes


# --- random_resized_crop_box -------------------------------------------------------------------

SIZES = [(500, 375), (375, 500), (224, 224), (1000, 50), (50, 1000), (7, 3)]


@pytest.mark.parametrize("width,height", SIZES)
@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.35, 1.0), (0.5, 2.0))])
def test_random_resized_crop_box_matches_torchvision_draws(width, height, scale, ratio):
    for seed in range(200):
        torch.manual_seed(seed)
        top, left, h, w = T.RandomResizedCrop.get_params(torch.empty(3, height, width), scale, ratio)
        after_torchvision = torch.rand(1)
        torch.manual_seed(seed)
        assert random_resized_crop_box(width, height, scale, ratio) == (left, top, w, h)
        assert torch.equal(torch.rand(1), after_torchvision)  # same number of draws taken
        g = torch.Generator().manual_seed(seed)
        assert random_resized_crop_box(width, height, scale, ratio, generator=g) == (left, top, w, h)


def test_random_resized_crop_box_properties():
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        left, top, w, h = random_resized_crop_box(500, 375, generator=g)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        assert 0.08 * 0.98 <= w * h / (500 * 375) <= 1.0
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03  # sides are rounded to whole pixels
    # no sample fits a 1000x50 strip: the centred fallback clamps to the widest allowed ratio
    assert random_resized_crop_box(1000, 50, generator=g) == ((1000 - 67) // 2, 0, 67, 50)


# --- center_crop_box ---------------------------------------------------------------------------


def test_center_crop_box_geometry():
    # 500x375 -> Resize(256) gives 341x256; CenterCrop(224) starts at round(58.5)=58, round(16)=16
    sx, sy = 500 / 341, 375 / 256
    assert center_crop_box(500, 375, 224, 256) == pytest.approx((58 * sx, 16 * sy, 224 * sx, 224 * sy))
    assert center_crop_box(256, 300, 224, 256) == pytest.approx((16, 38, 224, 224))
    # 686x512 -> 343x256: the offset round(59.5) is 60, as Python's round in torchvision gives
    assert center_crop_box(686, 512, 224, 256) == pytest.approx((120, 32, 448, 448))
    with pytest.raises(ValueError):
        center_crop_box(500, 375, 257, 256)


@pytest.mark.parametrize("name", ["wide", "tall", "gray", "palette", "rgba"])
def test_center_crop_matches_resize_then_center_crop(files, name):
    with Image.open(files[name]) as img:
        expected = T.Compose([T.Resize(256), T.CenterCrop(224)])(img.convert("RGB"))
    expected = torch.from_numpy(np.array(expected)).permute(2, 0, 1)
    got = load_crop(files[name], partial(center_crop_box, size=224, resize=256), 224)
    # Cropping after a resize does not resample, so one resize of the box is the same filter:
    # measured 0.001 mean (0.19 when upsampling, rounding only); shifting the box by half an
    # original pixel gives 2.6.
    assert _mean_abs(got, expected) < 0.5


# --- load_crop ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wide", "tall", "gray", "cmyk", "palette", "rgba"])
@pytest.mark.parametrize("size", [224, 97])
def test_load_crop_output_and_full_box_matches_pil(files, name, size, draft_spy):
    got = load_crop(files[name], _full, size)
    assert got.dtype == torch.uint8 and got.shape == (3, size, size) and got.is_contiguous()
    if not draft_spy:  # no reduced decode: exactly PIL's own convert + resize
        with Image.open(files[name]) as img:
            assert torch.equal(got, _reference(files[name], _full(*img.size), size))
    with open(files[name], "rb") as f:  # an open file works as well as a path
        assert torch.equal(load_crop(f, _full, size), got)


def test_load_crop_draft_only_when_crop_allows(files, draft_spy):
    load_crop(files["wide"], _full, 224)  # 375 < 2 * 224: full decode
    assert draft_spy == []
    load_crop(files["wide"], _full, 112)  # 375 >= 2 * 112 but < 4 * 112: half-size decode
    assert draft_spy == [(250, 188)]
    draft_spy.clear()
    load_crop(files["palette"], _full, 64)  # not a JPEG
    assert draft_spy == []


@pytest.mark.parametrize("box", [(0, 0, 1800, 1350), (300, 200, 900, 905), (1, 3, 1799, 1347)])
def test_load_crop_draft_close_to_full_decode(files, draft_spy, box):
    got = load_crop(files["big"], lambda w, h: box, 224)
    # the largest DCT scale that keeps the crop >= 224 each way: 4 for 1350 rows, 4 for 900
    assert draft_spy == [(450, 338)]
    # measured 0.54-0.60 mean on this content; a box not scaled to the draft would be far off
    assert _mean_abs(got, _reference(files["big"], box, 224)) < 1.5


def test_load_crop_truncated_jpeg_raises(files, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    data = files["wide"].read_bytes()
    with pytest.raises(OSError):
        load_crop(io.BytesIO(data[: len(data) // 2]), _full, 224)


# --- device-decode path ------------------------------------------------------------------------


def test_read_jpeg_with_box(files):
    data, box = read_jpeg_with_box(files["tall"], _full)
    assert data.dtype == torch.uint8 and data.dim() == 1
    assert data.numpy().tobytes() == files["tall"].read_bytes()
    assert box == (0, 0, 375, 500)
    with pytest.raises(ValueError, match="not a JPEG"):
        read_jpeg_with_box(files["palette"], _full)


@decode_warning
def test_decode_resized_crops_matches_load_crop(files):
    names = ["wide", "tall", "gray", "cmyk", "big", "wide"]
    g = torch.Generator().manual_seed(0)
    random_box = partial(random_resized_crop_box, generator=g)
    center_box = partial(center_crop_box, size=224, resize=256)
    # Integer boxes differ only by decoder rounding (measured <= 0.01 mean); center boxes are
    # rounded to whole pixels here (<= 1.3 mean); load_crop decodes "big" at 1/4 scale (<= 0.6).
    for box_fn, bound in [(random_box, 0.1), (center_box, 2.5), (_full, 0.1)]:
        read = [read_jpeg_with_box(files[n], box_fn) for n in names]
        got = decode_resized_crops([d for d, _ in read], [b for _, b in read], 224, "cpu")
        assert got.dtype == torch.uint8 and got.shape == (len(names), 3, 224, 224)
        for k, (name, (_, box)) in enumerate(zip(names, read, strict=True)):
            expected = load_crop(files[name], lambda w, h, b=box: b, 224)
            assert _mean_abs(got[k], expected) < (max(bound, 1.5) if name == "big" else bound)


@decode_warning
def test_decode_resized_crops_truncated_raises(files):
    data, box = read_jpeg_with_box(files["wide"], _full)
    with pytest.raises(RuntimeError):
        decode_resized_crops([data, data[: len(data) // 2]], [box, box], 224, "cpu")
    with pytest.raises(ValueError):
        decode_resized_crops([data], [box, box], 224, "cpu")
