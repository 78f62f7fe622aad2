"""`decode_image`: EXIF orientation, transparency on a background, JPEG draft decoding, and
the background setting (validated, part of the store key)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps, JpegImagePlugin

from shared.data import sources
from shared.data.sources import DEFAULT_BACKGROUND, FolderSource, decode_image
from shared.data.store import build_store, store_key

ORIENTATION = 0x0112
# The upright image each EXIF orientation means, written with numpy on the stored array.
UPRIGHT = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # stored turned 90 degrees anticlockwise: turn clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}
CUSTOM = (30, 160, 90)


def encode(pixels: np.ndarray, fmt: str, orientation: int | None = None, **kw) -> bytes:
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        kw["exif"] = exif.tobytes()
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def smooth(seed: int, h: int, w: int, cell: int) -> np.ndarray:
    """Photo-like content: random colours varying over about `cell` pixels."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // cell + 2, w // cell + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))


def centre_crop(a: np.ndarray, size: int) -> np.ndarray:
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top : top + size, left : left + size]


def full_decode(data: bytes, size: int) -> np.ndarray:
    """What decoding every pixel gives: PIL's own EXIF transpose, resize, crop (no draft)."""
    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img.convert("RGB"))
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    return centre_crop(np.asarray(img), size)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_the_image_upright(fmt, orientation):
    """Stored pixels, turned by numpy as the tag says, then centre-cropped: exactly what
    decode_image returns (the shorter side is `size`, so no resize and no draft)."""
    data = encode(smooth(orientation, 24, 40, cell=3), fmt, orientation)
    with Image.open(io.BytesIO(data)) as img:
        stored = np.asarray(img.convert("RGB"))  # PIL leaves the orientation to the caller
    expected = centre_crop(UPRIGHT[orientation](stored), 24)
    got = decode_image(io.BytesIO(data), 24)
    np.testing.assert_array_equal(got, expected)
    if orientation != 1:
        assert not np.array_equal(got, centre_crop(stored, 24))


def test_unknown_orientation_values_leave_the_image_as_stored():
    pixels = smooth(0, 16, 16, cell=3)
    for value in (0, 9, 300):
        np.testing.assert_array_equal(
            decode_image(io.BytesIO(encode(pixels, "PNG", value)), 16), pixels
        )


def blend(colour: np.ndarray, alpha: np.ndarray, background) -> np.ndarray:
    """The alpha-blend formula: colour * a + background * (1 - a), a = alpha / 255."""
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(colour * a + np.asarray(background, np.float64) * (1 - a))


def transparent_images(seed: int):
    """(name, PIL image, its colours HxWx3, its alpha HxW) for each kind of transparency."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    alpha[:5] = 0  # a fully transparent band: the background, exactly
    alpha[-5:] = 255
    yield "RGBA", Image.fromarray(np.dstack([colour, alpha])), colour, alpha
    grey = colour[..., 0]
    yield "LA", Image.fromarray(np.dstack([grey, alpha]), "LA"), np.dstack([grey] * 3), alpha
    # Palette images: one index transparent (GIF-style), or an alpha per palette entry.
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (20, 20), dtype=np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.ravel().tolist())
    img.info["transparency"] = 3
    yield "P index", img, palette[index], np.where(index == 3, 0, 255).astype(np.uint8)
    entry_alpha = rng.integers(0, 256, 16, dtype=np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.ravel().tolist())
    img.info["transparency"] = entry_alpha.tobytes()
    yield "P alpha", img, palette[index], entry_alpha[index]
    # RGB with one colour keyed transparent (PNG tRNS).
    keyed = colour.copy()
    keyed[:3, :3] = (1, 2, 3)
    img = Image.fromarray(keyed)
    img.info["transparency"] = (1, 2, 3)
    key_alpha = np.where((keyed == (1, 2, 3)).all(-1), 0, 255).astype(np.uint8)
    yield "RGB key", img, keyed, key_alpha


@pytest.mark.parametrize("background", [None, CUSTOM])
@pytest.mark.parametrize("kind", range(5))
def test_transparency_is_composited_on_the_background(kind, background):
    name, img, colour, alpha = list(transparent_images(kind))[kind]
    data = encode(img, "PNG", transparency=img.info.get("transparency"))
    with Image.open(io.BytesIO(data)) as back:  # the file really keeps its transparency
        assert back.mode in ("RGBA", "LA") or "transparency" in back.info, name
    kw = {} if background is None else {"background": background}
    got = decode_image(io.BytesIO(data), 20, **kw).astype(np.int16)
    expected = blend(colour, alpha, background or (255, 255, 255))
    assert np.abs(got - expected).max() <= 1, name  # 8-bit rounding of the blend
    clear = alpha == 0
    np.testing.assert_array_equal(
        got[clear], np.broadcast_to(background or (255,) * 3, got[clear].shape)
    )


def test_opaque_images_ignore_the_background():
    pixels = smooth(1, 20, 20, cell=3)
    for data in (
        encode(pixels, "PNG"),
        encode(np.dstack([pixels, np.full((20, 20), 255, np.uint8)]), "PNG"),
    ):
        np.testing.assert_array_equal(decode_image(io.BytesIO(data), 20, background=CUSTOM), pixels)


def drafted_scales(monkeypatch) -> list:
    """Records the DCT scale of every JPEG draft decode_image asks for."""
    seen, draft = [], JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = draft(self, mode, size)
        seen.append(self.decoderconfig[0] if out else 1)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return seen


@pytest.mark.parametrize("size,scale", [(64, 8), (224, 4)])
def test_large_jpegs_decode_at_a_reduced_scale_close_to_a_full_decode(monkeypatch, size, scale):
    """1600x1200 -> 64 px: 1/8 scale (200x150); -> 224 px: 1/4 (400x300, as 1/8 would be
    150 < 224). The result stays within a few levels of decoding every pixel."""
    seen = drafted_scales(monkeypatch)
    data = encode(smooth(2, 1200, 1600, cell=24), "JPEG", quality=92)
    got = decode_image(io.BytesIO(data), size).astype(np.int16)
    assert seen == [scale]
    diff = np.abs(got - full_decode(data, size))
    assert diff.mean() < 1.5 and diff.max() <= 12, (diff.mean(), diff.max())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_draft_with_a_partial_dct_block_and_any_orientation(monkeypatch, orientation):
    """521x513 at 1/8 scale is 66x65 pixels of which the last column and row are 1/8 image:
    wherever the orientation moves that strip, the resize must read only the image."""
    seen = drafted_scales(monkeypatch)
    data = encode(smooth(3, 513, 521, cell=32), "JPEG", orientation, quality=95)
    got = decode_image(io.BytesIO(data), 64).astype(np.int16)
    assert seen == [8]
    diff = np.abs(got - full_decode(data, 64))
    # Reading the partial strip as image shifts the far edge by ~0.9 px: mean ~13, max ~70.
    assert diff.mean() < 2 and diff.max() <= 12, (diff.mean(), diff.max())


def test_small_images_and_other_formats_are_not_drafted(monkeypatch):
    seen = drafted_scales(monkeypatch)
    decode_image(io.BytesIO(encode(smooth(4, 100, 120, cell=8), "JPEG")), 64)  # 100 // 64 = 1
    assert seen == [1]


@pytest.mark.parametrize(
    "value", [[255, 255], [0, 0, 256], [-1, 0, 0], "white", [1.5, 0, 0], [True, 0, 0], None]
)
def test_a_bad_background_is_refused_naming_the_key(tmp_path, value):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(ValueError, match=r"data\.source\.background=.*3 integers in 0\.\.255"):
        FolderSource(str(tmp_path), background=value)


def test_the_background_and_the_decoding_version_key_the_store(tmp_path, monkeypatch):
    """A store decoded on another background, or by an older decode_image, is rebuilt."""
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    cut_out = np.zeros((16, 16, 4), np.uint8)  # transparent except a red square
    cut_out[4:12, 4:12] = (255, 0, 0, 255)
    Image.fromarray(cut_out).save(root / "a" / "x.png")
    pinned = tmp_path / "store"
    white = build_store(FolderSource(str(root)), tmp_path, 16, path=pinned, progress=False)
    assert white.images[0, :, 0, 0].tolist() == [255, 255, 255]
    black = build_store(
        FolderSource(str(root), background=[0, 0, 0]), tmp_path, 16, path=pinned, progress=False
    )
    assert black.images[0, :, 0, 0].tolist() == [0, 0, 0]
    assert black.images[0, :, 8, 8].tolist() == [255, 0, 0]
    key = store_key(FolderSource(str(root)).describe(), 16)
    monkeypatch.setattr(sources, "DECODE_VERSION", sources.DECODE_VERSION - 1)
    assert store_key(FolderSource(str(root)).describe(), 16) != key


def test_yaml_backgrounds_equal_the_code_default(compose_cfg):
    for overrides in (["data/source=folder"], ["data/source=csv"]):
        cfg = compose_cfg("ssl", overrides)
        assert tuple(cfg.data.source.background) == DEFAULT_BACKGROUND
    assert tuple(compose_cfg("matching").data.source.background) == DEFAULT_BACKGROUND
