"""Upload checks: what is refused (and with which status) before and during decoding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from matching.service.images import ImageRejected, check_header, decode_upload
from shared.run_loading import load_run
from tests.serve.images import png_bytes, png_claiming, random_png, with_orientation


def rejected(data: bytes, max_pixels: int = 10_000_000, size: int = 32) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        decode_upload(data, "files[0] 'x'", size, max_pixels)
    return info.value


def test_upload_of_a_gallery_file_gets_exactly_the_stores_pixels(matching_run):
    run = load_run(matching_run.run_dir)
    run.datamodule.setup()
    source, store = run.datamodule.source, run.datamodule.store
    for row in (0, 7, len(store) - 1):
        path = Path(source.paths[source.ids.index(store.ids[row])])
        pixels, fmt = decode_upload(path.read_bytes(), "f", int(run.config.data.image_size), 10**6)
        assert fmt == "PNG"
        np.testing.assert_array_equal(pixels, store.images[row].numpy())


@pytest.mark.parametrize("orientation", [6, 8])
def test_an_exif_rotated_upload_decodes_as_the_upright_image(orientation):
    upright = np.random.default_rng(orientation).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    expected = decode_upload(png_bytes(upright), "f", 32, 10**6)[0]
    rotated, fmt = decode_upload(with_orientation(upright, orientation), "f", 32, 10**6)
    assert fmt == "PNG"
    np.testing.assert_array_equal(rotated, expected)


def test_a_transparent_upload_is_composited_on_the_given_background():
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent
    data = png_bytes(rgba)
    for background in ((255, 255, 255), (30, 160, 90)):
        pixels = decode_upload(data, "f", 32, 10**6, background)[0]
        np.testing.assert_array_equal(
            pixels, np.broadcast_to(np.array(background)[:, None, None], pixels.shape)
        )
    assert decode_upload(data, "f", 32, 10**6)[0].min() == 255  # white by default


def test_formats_resize_and_crop():
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 80, 3), dtype=np.uint8)).save(buf, format="JPEG")
    pixels, fmt = decode_upload(buf.getvalue(), "f", 32, 10**6)
    assert fmt == "JPEG" and pixels.shape == (3, 32, 32) and pixels.dtype == np.uint8


def test_not_an_image_empty_and_unsupported_formats():
    assert rejected(b"posting_id,image\n1,a.png\n").status == 400
    assert "is not an image" in str(rejected(b"hello"))
    assert "is empty" in str(rejected(b""))
    ico = io.BytesIO()  # PIL reads ICO, but it is not a listing-photo format here
    Image.new("RGB", (16, 16)).save(ico, format="ICO")
    err = rejected(ico.getvalue())
    assert err.status == 400 and "accepted formats: PNG, JPEG" in str(err)


def test_truncated_png_is_an_error_not_half_an_image():
    data = random_png(1, size=64)
    err = rejected(data[: len(data) // 2])
    assert err.status == 400 and "truncated or corrupt" in str(err) and "files[0] 'x'" in str(err)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (5000, 2001)])
def test_bombs_are_refused_from_the_header(width, height):
    data = png_claiming(width, height)
    assert len(data) < 200  # nothing to decode: the check must not need the pixels
    err = rejected(data, max_pixels=10_000_000)
    assert err.status == 413 and "decompression" in str(err)


def test_pixel_limit_is_exact():
    data = random_png(2, size=40)  # 1600 pixels
    assert check_header(data, "f", 1600) == "PNG"
    assert rejected(data, max_pixels=1599).status == 413
