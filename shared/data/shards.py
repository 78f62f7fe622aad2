"""The shard store: images kept encoded in litdata chunks, decoded in the loader workers.

The memory-mapped store (`shared.data.store`) keeps raw pixels: fastest to read, but N x 3 x
S x S bytes, which stops fitting on one disk long before a real catalogue does. This store
keeps each image encoded at its own aspect: the file as given (`keep`: JPEG, PNG or WebP
files), or re-encoded (JPEG, or lossless PNG / WebP) at shorter side `shorter_side`, written
once by `litdata.optimize` into chunk files that a `litdata.StreamingDataset` reads.

Layout of a store directory:

    <root>/<name>-shards-<key>/
        index.json, chunk-<worker>-<n>.bin   litdata's index and chunks; one sample per row:
                                             row, label, id (+ group, title), image bytes
        meta.json    key, settings, labels, ids, groups, titles, class names, file checksums
                     (size, sha256, sampled sha256, md5; written last)

The same directory can live in an S3-compatible bucket (`data.store_root=s3://...`): built
here, then uploaded with meta.json last and checked against the bucket's listing
(`shared.data.object_store`).

Rows are the source's rows in order (less any skipped corrupt file), so labels, ids and
groups, hence every split and fold, are those of the memmap store of the same source.
Indexing `store.images` gives what the memmap store gives, a uint8 square of `image_size`
(shorter side resized to it, centre crop: the evaluation view); `store.images.whole(rows)`
gives the stored images at their own aspect, which training crops from. The key, build
lock, atomic publish and verify-before-reuse are the memmap store's (`build_keyed`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shared.data.object_store import (
    S3Location,
    as_location,
    is_s3,
    listing,
    local_folder,
    read_meta,
    remote_damage,
    upload,
)
from shared.data.publish import build_lock
from shared.data.sources import (
    FileSource,
    Source,
    check_source,
    class_counts,
    decode_image,
    decode_whole,
)
from shared.data.store import (
    announce,
    build_keyed,
    file_changed,
    file_digests,
    store_key,
)

log = logging.getLogger(__name__)

SHARD_VERSION = 1
# data.shard_format -> (PIL format, lossless); lossy formats take data.shard_quality.
FORMATS = {"jpeg": ("JPEG", False), "png": ("PNG", True), "webp": ("WEBP", True)}
# data.shard_format=keep: image files stored byte for byte, if PIL reads them as one of these.
KEEP, KEPT_FORMATS = "keep", ("JPEG", "PNG", "WEBP")
SHARD_FORMATS = (*FORMATS, KEEP)
ROWS_PER_TASK = 64  # rows one optimize call decodes together (synthetic renders in batches)


def check_shard_settings(image_size: int, shorter_side: int | None, fmt: str, quality: int):
    """ValueError naming the key unless the settings make a store `image_size` reads from."""
    if fmt not in SHARD_FORMATS:
        raise ValueError(f"data.shard_format={fmt!r} is not one of {list(SHARD_FORMATS)}")
    if fmt == KEEP:
        if shorter_side is not None:
            raise ValueError(
                f"data.shard_shorter_side={shorter_side} re-encodes the images, but "
                "data.shard_format=keep stores the files as given: set one of them differently"
            )
        return
    if not FORMATS[fmt][1] and not (isinstance(quality, int) and 1 <= quality <= 100):
        raise ValueError(f"data.shard_quality={quality!r} must be an integer in 1..100")
    if shorter_side is not None and (not isinstance(shorter_side, int) or shorter_side < 1):
        raise ValueError(f"data.shard_shorter_side={shorter_side!r} must be a positive integer")
    if shorter_side is not None and shorter_side < image_size:
        raise ValueError(
            f"data.shard_shorter_side={shorter_side} is below data.image_size={image_size}: "
            "reads would upscale the stored images (set it to null: the image size)"
        )
    if fmt == "webp":
        from PIL import features

        if not features.check("webp"):
            raise ValueError("data.shard_format=webp: this Pillow was built without WebP")


def open_streaming(location: str | Path | S3Location, **kwargs):
    """A `litdata.StreamingDataset` over a shard store's chunks; every reader is made here
    (`kwargs`: StreamingDataset's, e.g. shuffle, seed, drop_last). A store in a bucket is
    read through litdata's bounded cache: an `S3Location` (a ShardStore's `path`) with its
    endpoint and cache settings, a plain `s3://` string with AWS_ENDPOINT_URL and litdata's
    default cache."""
    from litdata import StreamingDataset

    if is_s3(location):
        location = as_location(location)
        kwargs = {**location.reader_options(), **kwargs}
    return StreamingDataset(str(location), **kwargs)


def is_shard_store(path: str | Path | S3Location) -> bool:
    return is_s3(path) or (Path(path) / "index.json").is_file()


@dataclass
class ShardStore:
    """An opened shard store: the ImageStore interface (`images[rows]`, labels, ids, groups),
    images decoded on access at `image_size`."""

    path: Path | S3Location
    meta: dict
    image_size: int
    labels: torch.Tensor = field(init=False)
    images: ShardImages = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.meta["labels"], dtype=torch.int64)
        self.images = ShardImages(self)  # one litdata reader per process, kept

    @property
    def ids(self) -> list[str]:
        return self.meta["ids"]

    @property
    def samples(self) -> list[int]:
        """Per row, the litdata sample that holds it (workers write in no fixed order)."""
        return self.meta["samples"]

    @property
    def groups(self) -> list[str] | None:
        return self.meta.get("groups")

    @property
    def titles(self) -> list[str] | None:
        return self.meta.get("titles")

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    def __len__(self) -> int:
        return len(self.labels)

    def damage(self) -> str | None:
        """What is wrong with the store's files (local: sizes and sampled hashes; in a
        bucket: the listing's sizes and MD5s), or None."""
        if isinstance(self.path, S3Location):
            return remote_damage(self.path, self.meta)
        return shard_damage(self.path)

    @classmethod
    def open(cls, path: str | Path | S3Location, image_size: int) -> ShardStore:
        if is_s3(path):
            path = as_location(path)
            meta = read_meta(path)
            if meta is None:
                raise FileNotFoundError(f"{path} is not a complete shard store (no meta.json)")
            return cls(path, meta, image_size)
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file() or not is_shard_store(path):
            raise FileNotFoundError(f"{path} is not a complete shard store (no meta.json)")
        return cls(path, json.loads(meta_file.read_text()), image_size)


class ShardImages:
    """`store.images`: indexed like the memmap tensor (an int, a slice, rows), it reads and
    decodes those rows: uint8 [n, 3, S, S]; `whole(rows)` decodes them as stored. Each
    process opens its own StreamingDataset on first use, so a DataLoader's workers decode in
    parallel."""

    def __init__(self, store: ShardStore) -> None:
        self.store = store
        self._dataset, self._pid = None, None

    def __len__(self) -> int:
        return len(self.store)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), 3, self.store.image_size, self.store.image_size)

    def __getstate__(self) -> dict:
        return {"store": self.store, "_dataset": None, "_pid": None}  # reader threads stay

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            rows = torch.arange(len(self))[key]
        else:
            rows = torch.as_tensor(np.asarray(key), dtype=torch.int64)
        if rows.ndim == 0:
            return self._read(int(rows))
        if len(rows) == 0:
            return torch.empty(0, *self.shape[1:], dtype=torch.uint8)
        return torch.stack([self._read(int(r)) for r in rows])

    def whole(self, rows) -> list[torch.Tensor]:
        """The stored images of `rows`, upright RGB at their own aspect and size: uint8
        [3, h, w] each (what random-resized crops are drawn over, as in the official DINO
        recipe, rather than the centre square)."""
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.int64).reshape(-1).tolist()
        return [decode_shard_whole(self._bytes(row), self.store.meta["format"]) for row in rows]

    def _read(self, row: int) -> torch.Tensor:
        return decode_shard_image(
            self._bytes(row), self.store.image_size, self.store.meta["format"]
        )

    def _bytes(self, row: int) -> bytes:
        """The encoded image of `row`, as stored."""
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} is out of range for {len(self)} images")
        if self._pid != os.getpid():  # new, or copied into a forked loader worker
            self._dataset, self._pid = open_streaming(self.store.path), os.getpid()
        try:
            return self._sample(self.store.samples[row])["image"]
        except Exception as exc:  # a cut-short, missing or overwritten chunk
            problem = self.store.damage()
            raise RuntimeError(
                f"reading row {row} of the shard store {self.store.path} failed: {problem or exc}"
            ) from exc

    def _sample(self, index: int) -> dict:
        """litdata's sample `index`. From a bucket it is read as a slice, which makes
        litdata fetch the whole chunk into the bounded cache (an int index fetches each
        sample's bytes alone: one request per image)."""
        if isinstance(self.store.path, S3Location):
            return self._dataset[index : index + 1][0]
        return self._dataset[index]


def shard_formats(fmt: str) -> tuple[str, ...]:
    """The PIL decoders a store of `data.shard_format=fmt` may need (no others are tried)."""
    return KEPT_FORMATS if fmt == KEEP else (FORMATS[fmt][0],)


def decode_shard_image(data: bytes, image_size: int, fmt: str) -> torch.Tensor:
    """One stored image's bytes -> the evaluation view: uint8 [3, S, S], shorter side resized
    to S, centre crop."""
    pixels = decode_image(io.BytesIO(data), image_size, formats=shard_formats(fmt))
    return torch.from_numpy(pixels).permute(2, 0, 1)


def decode_shard_whole(data: bytes, fmt: str) -> torch.Tensor:
    """One stored image's bytes -> the whole image as stored, upright RGB at its own aspect:
    uint8 [3, h, w] (what training crops from; the random-access reads and the streaming
    loader both decode here)."""
    image = decode_whole(io.BytesIO(data), None, formats=shard_formats(fmt))
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def build_shard_store(
    source: Source,
    root: str | Path,
    image_size: int,
    shorter_side: int | None = None,
    fmt: str = "jpeg",
    quality: int = 90,
    name: str = "store",
    path: str | Path | None = None,
    chunk_bytes: str = "64MB",
    workers: int | None = None,
    start_method: str | None = None,
    s3_endpoint: str | None = None,
    s3_cache_dir: str | None = None,
    s3_cache_size: str | None = None,
) -> ShardStore:
    """Open the shard store for (source, shorter side, format), building it first if needed;
    it reads at `image_size`. `shorter_side` None: `image_size` (with `fmt="keep"`, the
    files' own sizes). `workers`: optimize
    processes (None: one per CPU), started by `start_method` (None: litdata's, spawn; fork
    saves seconds where torch runs one thread, as in the tests). `path` pins the directory
    as for `build_store`. A `root` or `path` of `s3://bucket/prefix` keeps the store in that
    bucket (`s3_endpoint`: None for AWS_ENDPOINT_URL or AWS), built locally, then published
    (`publish_remote`); reads go through litdata's cache in `s3_cache_dir` (None: litdata's
    default), at most `s3_cache_size` (e.g. "25GB")."""
    check_source(source)
    check_shard_settings(image_size, shorter_side, fmt, quality)
    if fmt == KEEP and not isinstance(source, FileSource):
        raise ValueError(
            f"data.shard_format=keep stores image files as given, but the data source "
            f"({type(source).__name__}) has no files: pick jpeg, png or webp"
        )
    shorter_side = None if fmt == KEEP else shorter_side or image_size
    quality = None if fmt == KEEP or FORMATS[fmt][1] else quality
    description = source.describe()
    settings = {"shard_format": fmt, "shard_quality": quality, "shard_version": SHARD_VERSION}
    key = store_key(description, shorter_side, store_kind="shards", **settings)

    def write(tmp: Path) -> None:
        if len(source) == 0:
            raise ValueError(f"data source {description.get('kind')} has no images")
        encode = _EncodeRows(source, shorter_side, fmt, quality)
        stored = _optimize(encode, tmp, chunk_bytes, workers, start_method)
        rows, found = read_back(tmp, stored)
        meta = {
            "key": key,
            "kind": "shards",
            "version": SHARD_VERSION,
            "shorter_side": shorter_side,
            "format": fmt,
            "quality": quality,
            "source": {k: v for k, v in description.items() if k != "files"},
            **_row_meta(source, rows),
            **found,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))

    if is_s3(path or root):
        url = str(path) if path else f"{str(root).rstrip('/')}/{name}-shards-{key}"
        path = S3Location(url, s3_endpoint, s3_cache_dir, s3_cache_size)
        built = publish_remote(path, key, write)
    else:
        path = Path(path) if path else Path(root) / f"{name}-shards-{key}"
        built = build_keyed(path, key, shard_damage, write)
    store = ShardStore.open(path, image_size)
    announce(path, built, len(store))
    return store


def publish_remote(location: S3Location, key: str, write) -> bool:
    """Put the store for `key` at `location` unless an intact one is there: built locally
    by `write` (with the local store's guarantees) under the cache directory, uploaded
    meta.json last, verified, the local copy removed; True if this call published it. Jobs
    on one machine take turns (the local build's lock); a failed upload keeps the finished
    local build for the next try."""
    client = location.client()
    if _remote_intact(location, key, client):
        return False
    local = local_folder(location, "builds")
    with build_lock(local.with_name(f"{local.name}.publish")):  # build_keyed locks `local`
        if _remote_intact(location, key, client, quiet=True):
            return False
        build_keyed(local, key, shard_damage, write)
        upload(local, location, client)
        if problem := remote_damage(location, read_meta(location, client), client):
            raise RuntimeError(
                f"the shard store just published to {location} is damaged: {problem}"
            )
        shutil.rmtree(local)
    return True


def _remote_intact(location: S3Location, key: str, client, quiet: bool = False) -> bool:
    """A complete store for `key` at `location` whose objects match meta.json."""
    meta = read_meta(location, client)
    if meta is not None and meta.get("key") == key:
        problem = remote_damage(location, meta, client)
        if problem is None:
            return True
        reason = f"is damaged ({problem})"
    elif meta is not None:
        reason = f"holds another store (key {meta.get('key')} != {key})"
    else:
        reason = "holds an unfinished upload (no meta.json)"
    if not quiet and (meta is not None or listing(location, client)):
        log.warning("Shard store at %s %s: rebuilding it", location, reason)
    return False


class _EncodeRows:
    """What each optimize worker runs on a list of source rows: one sample per row that
    decodes, nothing for one that does not (the build finds it missing)."""

    def __init__(self, source, shorter_side: int, fmt: str, quality: int | None) -> None:
        self.source, self.shorter_side = source, shorter_side
        self.fmt, self.quality = fmt, quality
        # Plain lists: what reaches the spawned workers is exactly what the main process has.
        columns = {"label": np.asarray(source.labels).tolist(), "id": list(map(str, source.ids))}
        extras = {"group": source.groups, "title": getattr(source, "titles", None)}
        columns |= {k: list(map(str, v)) for k, v in extras.items() if v is not None}
        self.columns = columns

    def __call__(self, rows: list[int]):
        images = self._files(rows) if self.fmt == KEEP else map(self._encode, self._images(rows))
        for row, image in zip(rows, images):
            if image is None:
                continue
            yield {
                "row": row,
                **{k: v[row] for k, v in self.columns.items()},
                "image": image,
            }

    def _images(self, rows: list[int]) -> list:
        """PIL images at shorter side `shorter_side`: files at their own aspect, other
        sources (synthetic renders) as the square their `load` gives; None where it fails."""
        from PIL import Image

        if isinstance(self.source, FileSource):
            out = []
            for row in rows:
                try:
                    out.append(
                        decode_whole(
                            self.source.paths[row],
                            self.shorter_side,
                            background=self.source.background,
                        )
                    )
                except Exception:  # PIL raises several types for bad files
                    out.append(None)
            return out
        images, bad = self.source.load(rows, self.shorter_side)
        good = iter(images.permute(0, 2, 3, 1).numpy())
        return [None if row in bad else Image.fromarray(next(good)) for row in rows]

    def _files(self, rows: list[int]) -> list[bytes | None]:
        """Each row's file bytes as given; None where PIL cannot decode it as JPEG / PNG /
        WebP (the build then names the file)."""
        from PIL import Image

        out = []
        for row in rows:
            data = Path(self.source.paths[row]).read_bytes()
            try:
                with Image.open(io.BytesIO(data), formats=KEPT_FORMATS) as img:
                    img.load()  # a truncated file fails here, at the build
            except Exception:  # PIL raises several types for bad files
                data = None
            out.append(data)
        return out

    def _encode(self, image) -> bytes | None:
        if image is None:
            return None
        pil_format, lossless = FORMATS[self.fmt]
        buffer = io.BytesIO()
        options = {"lossless": True} if self.fmt == "webp" else {}
        if not lossless:
            options["quality"] = self.quality
        image.save(buffer, format=pil_format, **options)
        return buffer.getvalue()


def _optimize(encode, tmp, chunk_bytes, workers, start_method):
    """Write the chunks of `encode.source` into `tmp`; the source rows they hold, in sample
    order, less the corrupt files (an error unless the source skips them)."""
    source = encode.source
    n = len(source)
    log.info("Encoding %d images into litdata shards in %s", n, tmp)
    rows = write_chunks(encode, n, tmp, chunk_bytes, workers, start_method)
    bad = sorted(set(range(n)) - set(rows))
    if bad:
        if not source.skip_corrupt:
            raise source.corrupt_error(bad)
        if len(bad) == n:
            raise ValueError(f"all {n} images of the data source are corrupt: nothing to store")
        log.warning("Skipped %d corrupt image(s), e.g. %s", len(bad), bad[:5])
    return rows


def write_chunks(fn, n: int, tmp: Path, chunk_bytes, workers, start_method) -> list[int]:
    """`litdata.optimize` of `fn` over rows 0..n-1 (lists of `ROWS_PER_TASK`; each sample
    names its `row`) into `tmp`: the rows the chunks hold, in sample order.

    By default worker processes are spawned: a forked child of a process whose OpenMP pool
    has several threads can hang in its first torch op (a synthetic render)."""
    import litdata

    tasks = [list(range(i, min(n, i + ROWS_PER_TASK))) for i in range(0, n, ROWS_PER_TASK)]
    with _rng_kept():
        litdata.optimize(
            fn=fn,
            inputs=tasks,
            output_dir=str(tmp),
            chunk_bytes=chunk_bytes,
            num_workers=min(workers or _cpus(), len(tasks)),
            # False: no per-worker helper processes, which a failed build would leave orphaned;
            # the order samples land in is read back instead (`_stored_rows`).
            keep_data_ordered=False,
            reorder_files=False,
            verbose=False,  # its progress lines advertise a cloud service; ours are logged
            start_method=start_method,
        )
    return _stored_rows(tmp)


def read_back(tmp: Path, stored: list[int]) -> tuple[list[int], dict]:
    """The rows the chunks in `tmp` hold, in row order, and the meta.json entries that find
    them (per row, the sample holding it: workers write in no fixed order) and verify them
    (`shard_damage`)."""
    order = np.argsort(stored, kind="stable")  # store row i is sample order[i]
    checksums = {
        f.name: {"size": f.stat().st_size, **file_digests(f, md5=True)} for f in _data_files(tmp)
    }
    return [stored[i] for i in order], {"samples": order.tolist(), "checksums": checksums}


@contextlib.contextmanager
def _rng_kept():
    """Restore Python's, numpy's and torch's global RNGs afterwards: litdata's optimize
    seeds them all with 42, which would make a run's training depend on the store kind."""
    states = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _stored_rows(path: Path) -> list[int]:
    """The source row of each sample, read back through litdata (which also proves every
    chunk readable)."""
    dataset = open_streaming(path)
    return [int(dataset[i]["row"]) for i in range(len(dataset))]


def _row_meta(source, rows: Sequence[int]) -> dict:
    """Labels, ids, groups, titles and class counts of the stored `rows`."""
    labels = np.asarray(source.labels)[list(rows)]
    titles = getattr(source, "titles", None)
    return {
        "num_images": len(rows),
        "num_skipped": len(source) - len(rows),
        "labels": labels.tolist(),
        "ids": [source.ids[i] for i in rows],
        "groups": None if source.groups is None else [source.groups[i] for i in rows],
        "titles": None if titles is None else [titles[i] for i in rows],
        "class_names": list(source.class_names),
        "class_counts": class_counts(labels, len(source.class_names)),
    }


def _data_files(path: Path) -> list[Path]:
    """litdata's index and every chunk it lists."""
    index = json.loads((path / "index.json").read_text())
    return [path / "index.json", *(path / c["filename"] for c in index["chunks"])]


def shard_damage(path: Path, full: bool = False) -> str | None:
    """What is wrong with the complete-looking shard store at `path`, or None: litdata's
    index must be readable and list exactly the chunks published, each of its recorded size
    (a copy cut short), its sampled blocks (every byte with `full`) as hashed at publish."""
    path = Path(path)
    recorded = json.loads((path / "meta.json").read_text())["checksums"]
    try:
        files = _data_files(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"index.json is missing or unreadable ({exc})"
    if sorted(f.name for f in files) != sorted(recorded):
        return f"index.json lists other chunks than the {len(recorded) - 1} published"
    for file in files:
        size = file.stat().st_size if file.is_file() else None
        if size != recorded[file.name]["size"]:
            return f"{file.name} holds {size} bytes, expected {recorded[file.name]['size']}"
    for file in files:
        if problem := file_changed(file, recorded[file.name], full):
            return problem
    return None
