"""The memory-mapped image store: decode once, then every epoch reads uint8 tensors.

Layout of a store directory:

    <root>/<name>-<key>/
        tensors/     TensorDict memmap: images uint8 [N,3,S,S], labels int64 [N], row int64 [N]
        meta.json    key, source description, ids, class names (written last)

The key hashes the source's description (files, sizes, mtimes and how they are decoded, or
the generator spec) and the image size, so a changed source or decoding gets a new store. A
store is built in a temporary directory and renamed into place, so a killed build leaves
nothing that looks complete, and jobs that start together build it once
(`shared.data.publish`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict
from tqdm.auto import tqdm

from shared.data.publish import build_once
from shared.data.sources import Source, check_source, class_counts

log = logging.getLogger(__name__)

STORE_VERSION = 1


def store_key(description: dict, image_size: int, **settings) -> str:
    """Hash of the source's description, the stored size and any other `settings` of how it
    is stored (the shard store's format): a change in any gives a new store."""
    desc = {"version": STORE_VERSION, "image_size": image_size, "source": description, **settings}
    blob = json.dumps(desc, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


@dataclass
class ImageStore:
    """An opened store: memory-mapped tensors plus the row metadata."""

    path: Path
    tensors: TensorDict
    meta: dict

    @property
    def images(self) -> torch.Tensor:
        return self.tensors["images"]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors["labels"]

    @property
    def ids(self) -> list[str]:
        return self.meta["ids"]

    @property
    def groups(self) -> list[str] | None:
        """Per row, the source's group (CSV `group_col`), or None when it has none."""
        return self.meta.get("groups")

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    def __len__(self) -> int:
        return int(self.tensors.batch_size[0])

    @classmethod
    def open(cls, path: str | Path) -> ImageStore:
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not a complete image store (no meta.json)")
        meta = json.loads(meta_file.read_text())
        return cls(path, TensorDict.load_memmap(path / "tensors"), meta)


def build_store(
    source: Source,
    root: str | Path,
    image_size: int,
    name: str = "store",
    path: str | Path | None = None,
    chunk_size: int = 512,
    progress: bool = True,
) -> ImageStore:
    """Open the store for (source, image_size), building it first if needed.

    `path` pins the directory; a store found there with another key (other source or size)
    is rebuilt, never silently reused.
    """
    check_source(source)
    description = source.describe()
    key = store_key(description, image_size)
    path = Path(path) if path else Path(root) / f"{name}-{key}"

    def write(tmp: Path) -> None:
        meta = _write_store(source, tmp, image_size, chunk_size, progress, path.name)
        meta = {
            "key": key,
            "version": STORE_VERSION,
            "image_size": image_size,
            "source": {k: v for k, v in description.items() if k != "files"},
            "checksums": {
                name: file_digests(tmp / "tensors" / f"{name}.memmap") for name in TENSORS
            },
            **meta,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))

    if not is_built(path, key, _damage) and len(source) == 0:
        raise ValueError(f"data source {description.get('kind')} has no images")
    built = build_keyed(path, key, _damage, write)
    store = ImageStore.open(path)
    announce(path, built, len(store))
    return store


def is_built(path: Path, key: str, damage) -> bool:
    """A complete store for `key` at `path` whose files pass `damage` (None: intact)."""
    if _store_key_at(path) != key:
        return False
    if problem := damage(path):  # e.g. a truncated copy: never trained on as zeros
        log.warning("Image store at %s is damaged (%s): rebuilding it", path, problem)
        return False
    return True


def build_keyed(path: Path, key: str, damage, write) -> bool:
    """Build the store for `key` at `path` with `write(tmp_dir)` (which writes meta.json
    last) unless an intact one is there; a store of another key there is rebuilt, never
    reused. Jobs starting together build it once (`build_once`); True if this call built."""

    def fill(tmp: Path) -> None:
        if path.exists():
            log.warning(
                "Store at %s was built from another source or size, or other shard settings "
                "(key %s != %s): rebuilding",
                path,
                _store_key_at(path),
                key,
            )
        write(tmp)

    return build_once(path, lambda at: is_built(at, key, damage), fill)


def announce(path: Path, built: bool, n: int) -> None:
    """One line per store, not one per stage that opens it."""
    if path not in _ANNOUNCED:
        _ANNOUNCED.add(path)
        log.info("%s image store %s (%d images)", "Built" if built else "Reusing", path, n)


_ANNOUNCED: set[Path] = set()


TENSORS = ("images", "labels", "row")
SAMPLED_BLOCKS, BLOCK = 32, 1 << 16  # what a reuse reads back: at most 2 MiB per file


def file_digests(file: Path, md5: bool = False) -> dict:
    """sha256 of the whole file and of `SAMPLED_BLOCKS` blocks spread evenly over it; with
    `md5`, also the file's MD5 (the ETag S3 gives a single-part upload), from the same read."""
    whole = _whole_digests(file, ("sha256", "md5") if md5 else ("sha256",))
    return {"sha256": whole.pop("sha256"), "sampled_sha256": _sampled_sha256(file), **whole}


def _whole_digests(file: Path, names: tuple[str, ...]) -> dict[str, str]:
    """The `names` hashes (hashlib's) of every byte of `file`, in one read."""
    digests = {name: hashlib.new(name, usedforsecurity=False) for name in names}
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 22):
            for digest in digests.values():
                digest.update(chunk)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def _sha256(file: Path) -> str:
    return _whole_digests(file, ("sha256",))["sha256"]


def _sampled_sha256(file: Path) -> str:
    size = file.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(file, "rb") as handle:
        for i in range(SAMPLED_BLOCKS):
            handle.seek(max(0, size - BLOCK) * i // max(1, SAMPLED_BLOCKS - 1))
            digest.update(handle.read(BLOCK))
    return digest.hexdigest()


def _damage(path: Path, full: bool = False) -> str | None:
    """What is wrong with the files of the complete-looking store at `path`, or None: each
    memmap must hold exactly the rows meta.json promises (a copy cut short by a full disk or
    a killed rsync would otherwise read as zero-filled images), and its sampled blocks (every
    byte with `full`) must hash as at publish (bit rot, a partial overwrite)."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    n, size = int(meta["num_images"]), int(meta["image_size"])
    expected = {"images": n * 3 * size * size, "labels": n * 8, "row": n * 8}
    for name, nbytes in expected.items():
        file = Path(path) / "tensors" / f"{name}.memmap"
        actual = file.stat().st_size if file.is_file() else None
        if actual != nbytes:
            return f"{file.name} holds {actual} bytes, expected {nbytes}"
    for name, recorded in (meta.get("checksums") or {}).items():  # stores before: sizes only
        if problem := file_changed(Path(path) / "tensors" / f"{name}.memmap", recorded, full):
            return problem
    return None


def file_changed(file: Path, recorded: dict, full: bool) -> str | None:
    """How `file` differs from its `file_digests` recorded at publish (sampled blocks, or
    every byte with `full`), or None."""
    kind, found = ("sha256", _sha256(file)) if full else ("sampled_sha256", _sampled_sha256(file))
    if found != recorded[kind]:
        return f"{file.name} does not match its {kind} recorded at publish"
    return None


def check_store(path: str | Path) -> str | None:
    """Every byte of a store (either kind) against the checksums recorded at publish: None
    if intact. A store in a bucket (`s3://...`): every file's size and MD5 in the listing."""
    from shared.data.object_store import is_s3
    from shared.data.shards import ShardStore, is_shard_store, shard_damage

    if is_s3(path):
        return ShardStore.open(path, image_size=1).damage()
    if is_shard_store(path):
        return shard_damage(Path(path), full=True)
    return _damage(Path(path), full=True)


def _store_key_at(path: Path) -> str | None:
    """The key in `path/meta.json`, or None when there is no complete store there."""
    try:
        return json.loads((Path(path) / "meta.json").read_text()).get("key")
    except (OSError, ValueError):
        return None


def _write_store(
    source, tmp: Path, image_size: int, chunk_size: int, progress: bool, name: str
) -> dict:
    """Decode every row into `tmp/tensors`; returns the row metadata (ids, classes, counts)."""
    n = len(source)
    template = TensorDict(
        {
            "images": torch.empty(n, 3, image_size, image_size, dtype=torch.uint8),
            "labels": torch.as_tensor(np.asarray(source.labels), dtype=torch.int64),
            "row": torch.arange(n, dtype=torch.int64),
        },
        batch_size=[n],
    )
    tensors = template.memmap_like(prefix=tmp / "tensors")
    tensors["labels"][:] = template["labels"]
    tensors["row"][:] = template["row"]
    del template
    bad: list[int] = []
    write = 0  # good rows are written contiguously; bad ones are dropped (when allowed)
    keep: list[int] = []
    with tqdm(
        total=n, desc=f"Building image store {name}", unit="img", disable=not progress
    ) as bar:
        for start in range(0, n, chunk_size):
            idx = list(range(start, min(n, start + chunk_size)))
            images, chunk_bad = source.load(idx, image_size)
            bad += chunk_bad
            bad_set = set(chunk_bad)
            good = [i for i in idx if i not in bad_set]
            tensors["images"][write : write + len(good)] = images
            keep += good
            write += len(good)
            bar.update(len(idx))
    if bad:
        if not source.skip_corrupt:
            raise source.corrupt_error(bad)
        if write == 0:
            raise ValueError(f"all {n} images of the data source are corrupt: nothing to store")
        log.warning("Skipped %d corrupt image(s), e.g. %s", len(bad), bad[:5])
        tensors = _compact(tensors, torch.as_tensor(keep, dtype=torch.int64), tmp, chunk_size)
    labels = np.asarray(source.labels)[keep]
    return {
        "num_images": write,
        "num_skipped": len(bad),
        "ids": [source.ids[i] for i in keep],
        "groups": None if source.groups is None else [source.groups[i] for i in keep],
        "class_names": list(source.class_names),
        "class_counts": class_counts(labels, len(source.class_names)),
    }


def _compact(tensors: TensorDict, keep: torch.Tensor, tmp: Path, chunk_size: int) -> TensorDict:
    """Copy the first len(keep) image rows into a right-sized memmap, chunk by chunk, so
    dropping corrupt rows never holds the whole image array in RAM."""
    m = len(keep)
    size = tensors["images"].shape[-1]
    template = TensorDict(
        {
            "images": torch.empty(m, 3, size, size, dtype=torch.uint8),
            "labels": tensors["labels"][keep].clone(),
            "row": keep,
        },
        batch_size=[m],
    )
    compact = template.memmap_like(prefix=tmp / "compact")
    compact["labels"][:] = template["labels"]
    compact["row"][:] = keep
    del template
    for start in range(0, m, chunk_size):
        stop = min(m, start + chunk_size)
        compact["images"][start:stop] = tensors["images"][start:stop]
    del tensors
    shutil.rmtree(tmp / "tensors")
    os.replace(tmp / "compact", tmp / "tensors")
    return compact


def main(argv: list[str] | None = None) -> int:
    """`python -m shared.data.store --check <store dir> [...]`: full check of stores."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--check", nargs="+", required=True, metavar="STORE_DIR")
    bad = 0
    for path in parser.parse_args(argv).check:
        problem = check_store(path)
        print(f"{path}: {problem or 'intact'}")
        bad += problem is not None
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
