"""Where images come from: a folder of class subfolders, a CSV, or the synthetic generator.

A source knows its rows (ids, labels) and how to decode a chunk of them into a fixed-size
uint8 tensor. `describe()` is what keys the on-disk store: change the data, get a new store.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class CorruptImagesError(ValueError):
    pass


# Decoding changes that alter stored pixels bump this; it is part of every file source's
# `describe()`, so stores decoded the old way are rebuilt, not reused. 2: EXIF orientation,
# transparency on `background`, JPEG draft decoding.
DECODE_VERSION = 2
# What transparent pixels are composited on (RGB); conf/data*.yaml and conf/serve.yaml agree.
DEFAULT_BACKGROUND = (255, 255, 255)

# EXIF orientation -> how the stored pixels become upright: (swap the axes, then mirror
# left-right, then mirror top-bottom). 1 and unknown values: as stored.
_ORIENTATION = {
    2: (False, True, False),
    3: (False, True, True),
    4: (False, False, True),
    5: (True, False, False),
    6: (True, True, False),
    7: (True, True, True),
    8: (True, False, True),
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
ORIENTATION_TAG = 0x0112  # EXIF Orientation


def check_background(value, key: str) -> tuple[int, int, int]:
    """`value` as an (r, g, b) tuple; ValueError naming `key` unless it is 3 ints in 0..255."""
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if (
        items is None
        or len(items) != 3
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in items)
    ):
        raise ValueError(
            f"{key}={value!r} is not a colour: expected 3 integers in 0..255 (r, g, b), "
            f"e.g. [255, 255, 255] for white"
        )
    return tuple(items)


def decode_image(
    path,
    size: int,
    formats: tuple[str, ...] | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> np.ndarray:
    """Decode (`decode_whole`: upright, transparency on `background`, shorter side `size`),
    then centre-crop: HxWx3 uint8 with H = W = `size`.

    `path` is a file path or a binary file object; `formats` limits the PIL decoders tried
    (None: any format PIL knows). Store builds, inference and the service all decode here,
    so one image gets the same pixels on every path."""
    img = decode_whole(path, size, formats, background)
    nw, nh = img.size
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on views


def decode_whole(
    path,
    size: int | None,
    formats: tuple[str, ...] | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
):
    """Decode, turn upright (EXIF orientation), composite transparency on `background`,
    resize the shorter side to `size` (bicubic), aspect kept: an RGB PIL image (`size`
    None: at the file's own size).

    A JPEG much larger than `size` is decoded at a reduced DCT scale (1/2, 1/4, 1/8), never
    below `size`: several times faster, and the resize that follows hides the difference.
    The shard store keeps images this way (whole, at their own aspect)."""
    from PIL import Image

    with Image.open(path, formats=formats) as img:
        full_size = img.size
        # None unless a reduced JPEG scale applies
        drafted = img.draft("RGB", (size, size)) if size is not None else None
        img.load()  # a truncated file fails here, not later in training
        box = drafted[1] if drafted else (0, 0, *img.size)
        img, box, full_size = _upright(img, box, full_size)
        img = _on_background(img, background)
    if size is None:
        return img
    w, h = full_size  # the resize is that of a full-scale decode
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    return img.resize((nw, nh), Image.BICUBIC, box=box)


def _upright(img, box: tuple, full_size: tuple[int, int]):
    """(upright image, where `box` lies in it, upright full size) per the EXIF orientation.

    `box` is the part of a draft-decoded JPEG that holds the image: a partial DCT block at
    the right / bottom edge lands elsewhere once the image is turned."""
    from PIL import Image

    swap, mirror_x, mirror_y = _ORIENTATION.get(
        img.getexif().get(ORIENTATION_TAG), (False, False, False)
    )
    if swap:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        box, full_size = (box[1], box[0], box[3], box[2]), full_size[::-1]
    w, h = img.size
    if mirror_x:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        box = (w - box[2], box[1], w - box[0], box[3])
    if mirror_y:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        box = (box[0], h - box[3], box[2], h - box[1])
    return img, box, full_size


def _on_background(img, background: tuple[int, int, int]):
    """RGB, with transparent pixels (an alpha band or a palette / colour-key transparency
    entry) composited on `background` rather than dropped (which shows them black)."""
    from PIL import Image

    transparent = img.mode in _ALPHA_MODES or (
        img.mode in ("P", "L", "RGB", "1") and "transparency" in img.info
    )
    if not transparent:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, background)
    out.paste(rgba, mask=rgba)  # RGBA as its own mask: blends by its alpha band
    return out


@runtime_checkable
class Source(Protocol):
    """What the image store reads from a data source: one row per image."""

    labels: np.ndarray  # int class of each row (0 .. len(class_names) - 1; UNLABELLED: none)
    ids: list[str]  # a unique id per row
    class_names: list[str]
    groups: list | None  # each row's group (for data.split_by=group), or None
    skip_corrupt: bool  # False: a corrupt image stops the build (`corrupt_error`)

    def __len__(self) -> int: ...

    def describe(self) -> dict:
        """Everything that decides the stored pixels: the store's key hashes it."""
        ...

    def load(self, indices: Sequence[int], size: int) -> tuple[torch.Tensor, list[int]]:
        """uint8 images [n, 3, size, size] of the good rows, and the rows that failed."""
        ...

    def corrupt_error(self, bad: list[int]) -> Exception: ...


UNLABELLED = -1  # the label of a row without one: trained on without labels, never scored


def class_counts(labels, num_classes: int) -> list[int]:
    """Images per class; unlabelled rows count for none."""
    labels = np.asarray(labels)
    return np.bincount(labels[labels != UNLABELLED], minlength=num_classes).tolist()


def check_source(source) -> None:
    """TypeError naming what `source` lacks of the `Source` protocol (a user's own class)."""
    members = ("labels", "ids", "class_names", "groups", "skip_corrupt", "__len__")
    missing = [m for m in (*members, "describe", "load", "corrupt_error") if not hasattr(source, m)]
    if missing:
        raise TypeError(
            f"{type(source).__name__} is not a data source: it lacks {missing} "
            "(see shared.data.sources.Source)"
        )


class FileSource:
    """Rows backed by image files; decoding runs on a thread pool (PIL releases the GIL)."""

    paths: list[Path]
    labels: np.ndarray
    ids: list[str]
    class_names: list[str]
    groups: list | None = None
    # Where this source's settings live in the config, for error messages that name a key.
    config_key = "data.source"

    def __init__(
        self,
        skip_corrupt: bool = False,
        num_threads: int = 4,
        background: Sequence[int] = DEFAULT_BACKGROUND,
    ) -> None:
        self.skip_corrupt = skip_corrupt
        self.num_threads = num_threads
        self.background = check_background(background, f"{self.config_key}.background")

    def __len__(self) -> int:
        return len(self.paths)

    def _decoding(self) -> dict:
        """How files become pixels, for `describe()`: a change rebuilds the store."""
        return {"version": DECODE_VERSION, "background": list(self.background)}

    def _file_fingerprint(self) -> list:
        # Nanosecond mtimes: a file rewritten within the same second still changes the key.
        out = []
        for p in self.paths:
            st = p.stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
        return out

    def load(self, indices: Sequence[int], size: int) -> tuple[torch.Tensor, list[int]]:
        """Decode rows; returns (images of the good rows, indices of the bad rows)."""

        def one(i):
            try:
                return decode_image(self.paths[i], size, background=self.background)
            except Exception as exc:  # PIL raises several types for bad files
                return exc

        with ThreadPoolExecutor(self.num_threads) as pool:
            results = list(pool.map(one, indices))
        bad = [i for i, r in zip(indices, results) if isinstance(r, Exception)]
        good = [
            torch.from_numpy(r).permute(2, 0, 1) for r in results if not isinstance(r, Exception)
        ]
        images = torch.stack(good) if good else torch.empty(0, 3, size, size, dtype=torch.uint8)
        return images, bad

    def corrupt_error(self, bad: list[int]) -> CorruptImagesError:
        listed = "\n  ".join(str(self.paths[i]) for i in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        return CorruptImagesError(
            f"{len(bad)} image file(s) could not be decoded (corrupt or truncated):\n  {listed}"
            f"{more}\nFix or remove them, or set {self.config_key}.skip_corrupt=true to skip them."
        )


class FolderSource(FileSource):
    """`root/<class name>/<image>`: the ImageFolder layout."""

    def __init__(
        self,
        root: str,
        skip_corrupt: bool = False,
        num_threads: int = 4,
        background: Sequence[int] = DEFAULT_BACKGROUND,
    ) -> None:
        super().__init__(skip_corrupt, num_threads, background)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.source.root={str(self.root)!r} is not a directory")
        classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not classes:
            raise ValueError(f"data.source.root={str(self.root)!r} has no class subfolders")
        paths, labels = [], []
        for label, name in enumerate(classes):
            files = sorted(
                f
                for f in (self.root / name).rglob("*")
                if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
            )
            if not files:
                raise ValueError(
                    f"class folder {str(self.root / name)!r} has no images "
                    f"(looked for {', '.join(IMAGE_EXTENSIONS)})"
                )
            paths += files
            labels += [label] * len(files)
        self.paths, self.labels, self.class_names = paths, np.asarray(labels), classes
        self.ids = [str(p.relative_to(self.root)) for p in paths]

    def describe(self) -> dict:
        return {
            "kind": "folder",
            "root": str(self.root.resolve()),
            "decoding": self._decoding(),
            "files": self._file_fingerprint(),
        }


class CsvSource(FileSource):
    """A CSV with an image column (paths relative to `image_dir`) and a label column; with
    `group_col`, a column of groups (the same item shot twice, near-duplicates) that
    `data.split_by=group` keeps on one side of every split. A row whose label cell is empty
    is unlabelled (`UNLABELLED`): always in train, never in an evaluation."""

    def __init__(
        self,
        csv_path: str,
        image_dir: str | None = None,
        image_col: str = "image",
        label_col: str | None = "label",
        id_col: str | None = None,
        group_col: str | None = None,
        skip_corrupt: bool = False,
        num_threads: int = 4,
        background: Sequence[int] = DEFAULT_BACKGROUND,
    ) -> None:
        import pandas as pd

        super().__init__(skip_corrupt, num_threads, background)
        self.csv_path = Path(csv_path).expanduser()
        if not self.csv_path.is_file():
            raise FileNotFoundError(
                f"{self.config_key}.csv_path={str(self.csv_path)!r} does not exist"
            )
        df = pd.read_csv(self.csv_path, dtype=str, keep_default_na=False)
        required = [c for c in (image_col, label_col, id_col, group_col) if c]
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise ValueError(
                f"{self.csv_path} lacks required column(s) {missing}; it has {list(df.columns)} "
                f"(set {self.config_key}.image_col / label_col / id_col / group_col)"
            )
        if df.empty:
            raise ValueError(f"{self.csv_path} has no rows")
        if id_col and df[id_col].duplicated().any():
            dup = df.loc[df[id_col].duplicated(), id_col].head(5).tolist()
            raise ValueError(f"{self.csv_path}: column {id_col!r} has duplicated ids, e.g. {dup}")
        self.image_dir = Path(image_dir).expanduser() if image_dir else self.csv_path.parent
        self.paths = [self.image_dir / p for p in df[image_col]]
        absent = [str(p) for p in self.paths if not p.is_file()]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} image(s) listed in {self.csv_path} are missing under "
                f"{self.image_dir}, e.g. {absent[:5]}"
            )
        if label_col:
            # An empty label cell: an unlabelled row (a catalog's extra images), which
            # self-supervised training uses and no split scores.
            values = df[label_col].str.strip().to_numpy()
            labelled = values != ""
            names, codes = np.unique(values[labelled], return_inverse=True)
            labels = np.full(len(df), UNLABELLED, dtype=np.int64)
            labels[labelled] = codes
        else:  # unlabelled postings (inference): one placeholder class
            names, labels = np.array(["unlabelled"]), np.zeros(len(df), dtype=np.int64)
        self.class_names = [str(n) for n in names]
        self.labels = labels.astype(np.int64)
        self.ids = df[id_col].tolist() if id_col else [str(p) for p in df[image_col]]
        self.group_col = group_col
        self.groups = df[group_col].tolist() if group_col else None
        # Listing titles for matching by text ("" where a row has none); None: no such column.
        self.titles = df["title"].tolist() if "title" in df.columns else None
        self.frame = df

    def describe(self) -> dict:
        st = self.csv_path.stat()
        return {
            "kind": "csv",
            "csv": str(self.csv_path.resolve()),
            "group_col": self.group_col,
            "csv_size": st.st_size,
            "csv_mtime": st.st_mtime_ns,
            "image_dir": str(self.image_dir.resolve()),
            "decoding": self._decoding(),
            "files": self._file_fingerprint(),
        }


class PostingsSource(CsvSource):
    """Shopee-style postings: a CSV of posting_id, image, label_group (+ title). Postings
    sharing an `image_phash` are one picture, so they form a group (`group_col`) that folds
    and `data.split_by=group` keep together.

    With no `csv_path`, the `synthetic` products are first written out (once per spec, under
    `synthetic_dir`) in exactly this format, so the default run reads files through the path
    a user's data takes.
    """

    def __init__(
        self,
        csv_path: str | None = None,
        image_dir: str | None = None,
        synthetic: SyntheticSource | None = None,
        synthetic_dir: str | None = None,
        label_col: str | None = "label_group",
        id_col: str | None = "posting_id",
        group_col: str | None = "image_phash",
        **kwargs,
    ) -> None:
        if csv_path is None:
            if synthetic is None or synthetic_dir is None:
                raise ValueError(
                    f"set {self.config_key}.csv_path (your postings CSV), or both "
                    f"{self.config_key}.synthetic and {self.config_key}.synthetic_dir"
                )
            csv_path = synthetic_postings(synthetic_dir, synthetic.spec)
            image_dir = Path(csv_path).parent / "images"
        super().__init__(
            str(csv_path), image_dir, label_col=label_col, id_col=id_col, group_col=group_col,
            **kwargs,
        )  # fmt: skip


def synthetic_postings(root: str | Path, spec) -> Path:
    """Write (once) the synthetic products of `spec` (a SyntheticProductsSpec or its fields)
    as a Shopee-style CSV + images; return the CSV. Each spec gets its own folder
    `<root>/<hash of spec>/`, so changing sizes never clashes."""
    import hashlib
    import json
    from dataclasses import asdict

    from shared.data.synthetic import GENERATOR_VERSION, SyntheticProducts, write_image_folder_csv

    products = SyntheticProducts(spec)
    # The generator version is part of the key: a new version writes a new folder.
    described = {**asdict(products.spec), "generator_version": GENERATOR_VERSION}
    key = hashlib.sha1(json.dumps(described, sort_keys=True).encode()).hexdigest()
    return write_image_folder_csv(products, Path(root) / key[:10])


class SyntheticSource:
    """The embedded synthetic products set, rendered straight into the store."""

    def __init__(self, **spec) -> None:
        from shared.data.synthetic import SyntheticProducts, SyntheticProductsSpec

        self.spec = SyntheticProductsSpec(**spec)
        self.products = SyntheticProducts(self.spec)
        # A copy, not a view of the tensor: a view reaches a spawned process (the shard
        # store's build workers) as garbage, torch's pickler sharing the tensor, not the view.
        self.labels = self.products.labels.numpy().copy()
        self.ids = [f"p{i:07d}" for i in range(len(self.products))]
        self.class_names = [str(c) for c in range(self.products.num_classes)]
        self.skip_corrupt = False
        self.groups = None
        self._at_size = None  # rendered directly at the store's size when it differs

    def __len__(self) -> int:
        return len(self.products)

    @property
    def titles(self) -> list[str]:
        return self.products.titles

    def corrupt_error(self, bad: list[int]) -> Exception:
        return CorruptImagesError(f"synthetic rows failed to render: {bad[:5]}")

    def describe(self) -> dict:
        from dataclasses import asdict

        from shared.data.synthetic import GENERATOR_VERSION

        return {"kind": "synthetic", "generator_version": GENERATOR_VERSION, **asdict(self.spec)}

    def load(self, indices: Sequence[int], size: int) -> tuple[torch.Tensor, list[int]]:
        if size != self.spec.image_size and (
            self._at_size is None or self._at_size.spec.image_size != size
        ):
            from dataclasses import replace

            from shared.data.synthetic import SyntheticProducts

            self._at_size = SyntheticProducts(replace(self.spec, image_size=size))
        products = self.products if size == self.spec.image_size else self._at_size
        return products.render(torch.as_tensor(list(indices))), []
