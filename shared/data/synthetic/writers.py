"""Writing a synthetic set to disk: image files + a Shopee-style CSV, or ImageFolder class
folders, built in a temp dir and renamed into place once complete (idempotent per spec)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from shared.data.publish import build_once
from shared.data.synthetic.products import SyntheticProducts
from shared.data.synthetic.recipes import GENERATOR_VERSION


def image_phash(images: torch.Tensor) -> list[str]:
    """8x8 mean hash of uint8 [N,3,H,W] images as 16 hex digits; equal images, equal hash.

    Integer arithmetic throughout, so the hash is exact and independent of the batch.
    """
    x = images.to(torch.int64)
    gray = (299 * x[:, 0] + 587 * x[:, 1] + 114 * x[:, 2]) // 1000  # [N,H,W]
    n, h, w = gray.shape
    rb = torch.arange(h) * 8 // h
    cb = torch.arange(w) * 8 // w
    cell = (rb[:, None] * 8 + cb[None, :]).flatten()
    sums = torch.zeros(n, 64, dtype=torch.int64).index_add_(1, cell, gray.flatten(1))
    counts = torch.bincount(cell, minlength=64)
    # bit = cell mean > image mean, compared by cross-multiplying (exact).
    bits = sums * (h * w) > gray.flatten(1).sum(1, keepdim=True) * counts
    # Two 32-bit halves: a 64-bit weight would overflow int64.
    w = 2 ** torch.arange(31, -1, -1, dtype=torch.int64)
    hi, lo = (bits[:, :32] * w).sum(1).tolist(), (bits[:, 32:] * w).sum(1).tolist()
    return [f"{a:08x}{b:08x}" for a, b in zip(hi, lo, strict=True)]


_MARKER = ".complete.json"


def _marker(products: SyntheticProducts, kind: str, **extra) -> dict:
    return {
        "kind": kind,
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(products.spec),
        "rows": len(products),
        **extra,
    }


def _is_complete(out_dir: Path, marker: dict) -> bool:
    try:
        return json.loads((out_dir / _MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def _write_atomically(
    out_dir: Path, marker: dict, fill: Callable[[Path], None], overwrite: bool
) -> bool:
    """Build in a temp dir beside ``out_dir``, then rename it into place.

    Returns False when a complete copy with the same marker is already there (idempotent),
    also when another process wrote it while this one waited for the build lock. A crash
    leaves at most a temp dir (removed by the next build), never a half-written ``out_dir``.
    """
    out_dir = Path(out_dir)

    def fill_new(tmp: Path) -> None:
        if out_dir.exists() and not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not this data set; pass overwrite=True")
        fill(tmp)
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))

    return build_once(out_dir, lambda at: _is_complete(at, marker), fill_new)


def _save_batch(
    images: torch.Tensor, paths: Sequence[Path], fmt: str, quality: int, pool: ThreadPoolExecutor
) -> None:
    from PIL import Image

    arrays = images.permute(0, 2, 3, 1).contiguous().numpy()

    def save(i: int) -> None:
        img = Image.fromarray(arrays[i])
        if fmt == "png":
            img.save(paths[i], format="PNG", compress_level=1)
        else:
            img.save(paths[i], format="JPEG", quality=quality)

    list(pool.map(save, range(len(paths))))


def write_image_folder_csv(
    products: SyntheticProducts,
    out_dir: str | Path,
    *,
    image_format: str = "png",
    jpeg_quality: int = 90,
    batch_size: int = 256,
    num_threads: int = 2,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir/images/<posting_id>.<ext>`` plus ``out_dir/postings.csv``; return the CSV.

    The CSV has Shopee's columns, ``posting_id,image,label_group,image_phash,title``, with
    ``image`` relative to ``images/``. Skips the work if a complete copy of the same spec is
    there already.
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    out_dir = Path(out_dir)
    marker = _marker(
        products,
        "image_folder_csv",
        image_format=image_format,
        jpeg_quality=jpeg_quality if image_format == "jpg" else None,
    )

    def fill(tmp: Path) -> None:
        (tmp / "images").mkdir()
        ids, titles, lgs = products.posting_ids, products.titles, products.label_groups.tolist()
        with (
            open(tmp / "postings.csv", "w", newline="") as fh,
            ThreadPoolExecutor(max(1, num_threads)) as pool,
        ):
            writer = csv.writer(fh)
            writer.writerow(["posting_id", "image", "label_group", "image_phash", "title"])
            for images, _, idx in products.iter_batches(
                batch_size, progress=progress, desc=f"write {out_dir.name}"
            ):
                names = [f"{ids[i]}.{image_format}" for i in idx.tolist()]
                _save_batch(
                    images, [tmp / "images" / n for n in names], image_format, jpeg_quality, pool
                )
                for i, name, ph in zip(idx.tolist(), names, image_phash(images), strict=True):
                    writer.writerow([ids[i], name, lgs[i], ph, titles[i]])

    _write_atomically(out_dir, marker, fill, overwrite)
    return out_dir / "postings.csv"


def write_class_folders(
    products: SyntheticProducts,
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    num_threads: int = 2,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the ImageFolder layout ``out_dir/<label>/<index>.png``; return ``out_dir``.

    Names are zero-padded so that ImageFolder's sorted class order equals the label ids.
    """
    out_dir = Path(out_dir)
    marker = _marker(products, "class_folders")
    lw = len(str(max(products.num_classes - 1, 0)))
    iw = len(str(max(len(products) - 1, 0)))

    def fill(tmp: Path) -> None:
        for c in range(products.num_classes):
            (tmp / f"{c:0{lw}d}").mkdir()
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            for images, labels, idx in products.iter_batches(
                batch_size, progress=progress, desc=f"write {out_dir.name}"
            ):
                paths = [
                    tmp / f"{c:0{lw}d}" / f"{i:0{iw}d}.png"
                    for c, i in zip(labels.tolist(), idx.tolist(), strict=True)
                ]
                _save_batch(images, paths, "png", 0, pool)

    _write_atomically(out_dir, marker, fill, overwrite)
    return out_dir
