"""Uploaded image bytes -> the uint8 tensor the model embeds, refusing what is unsafe.

Checks happen in the cheapest order: an empty upload, then the header only (format among
`FORMATS`, pixel count under `max_pixels`, before a single pixel is decoded, so a tiny file
that claims 100000 x 100000 pixels costs nothing), then the decode (a large JPEG at a reduced
DCT scale, never below the model's input size). Decoding itself is
`shared.data.sources.decode_image`, the function that built the gallery's image store, so an
uploaded copy of a gallery image gets exactly that image's pixels. PIL's
`LOAD_TRUNCATED_IMAGES` stays False: a truncated file is an error, never half an image.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.data.sources import DEFAULT_BACKGROUND, decode_image

# Raster formats a listing photo comes in. Everything else PIL could open (EPS through
# Ghostscript, PDF, ICO, ...) is refused before a decoder runs.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
EXTENSIONS = {
    "PNG": ".png",
    "JPEG": ".jpg",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
}


class ImageRejected(ValueError):
    """An upload that is not a usable image; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def describe_upload(index: int, filename: str | None) -> str:
    """How a message names an upload: its position and (shortened, quoted) client filename.
    The filename is only ever shown, never used as a path."""
    name = (filename or "")[:80]
    return f"files[{index}] {name!r}" if name else f"files[{index}]"


def check_header(data: bytes, what: str, max_pixels: int) -> str:
    """The image's format after reading its header only; ImageRejected when the upload is
    empty, not an image of `FORMATS`, or larger than `max_pixels`."""
    return read_header(data, what, max_pixels)[0]


def read_header(data: bytes, what: str, max_pixels: int) -> tuple[str, int]:
    """(format, width x height) from the header only; ImageRejected as `check_header`."""
    if not data:
        raise ImageRejected(400, f"{what} is empty")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            width, height = img.size
            fmt = img.format
    except Image.DecompressionBombError as exc:  # PIL's own limit, above ours if max is huge
        raise ImageRejected(413, f"{what} is too large to decode: {exc}") from None
    except UnidentifiedImageError:
        raise ImageRejected(
            400, f"{what} is not an image (accepted formats: {', '.join(FORMATS)})"
        ) from None
    except Exception as exc:  # a header PIL recognises but cannot parse
        raise ImageRejected(400, f"{what} has a corrupt image header: {exc}") from None
    if width * height > max_pixels:
        raise ImageRejected(
            413,
            f"{what} is {width}x{height} = {width * height} pixels, above the limit "
            f"max_pixels={max_pixels} (decompression-bomb guard)",
        )
    return fmt, width * height


def decode_upload(
    data: bytes,
    what: str,
    size: int,
    max_pixels: int,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> tuple[np.ndarray, str]:
    """Checked and decoded upload, upright, transparency on `background`, resized and
    centre-cropped: (uint8 [3, size, size], PIL format name)."""
    fmt = check_header(data, what, max_pixels)
    try:
        pixels = decode_image(io.BytesIO(data), size, formats=FORMATS, background=background)
    except Exception as exc:  # truncated or corrupt data (PIL raises several types)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageRejected(
            400, f"{what} could not be decoded (truncated or corrupt): {reason}"
        ) from None
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)), fmt
