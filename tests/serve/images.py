"""Image bytes for the service tests: good, truncated, not an image, and header-only bombs."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_bytes(pixels: np.ndarray) -> bytes:
    """An HxWx3 uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def random_png(seed: int, size: int = 48) -> bytes:
    """A noise image unlike any synthetic product."""
    rng = np.random.default_rng(seed)
    return png_bytes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A few dozen bytes of valid PNG header that claim `width` x `height` RGB pixels: a
    decompression bomb's signature (the pixel data would be built by inflating)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def with_orientation(pixels: np.ndarray, orientation: int, fmt: str = "PNG") -> bytes:
    """The image a camera writes for upright `pixels` held with EXIF `orientation` 6 (stored
    turned anticlockwise) or 8 (turned clockwise): viewers turn it back by the tag."""
    stored = np.rot90(pixels, {6: 1, 8: -1}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buf, format=fmt, exif=exif.tobytes())
    return buf.getvalue()
