"""The image store and its sources: stored bytes, reuse, keys, atomic builds, bad input."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensordict import MemoryMappedTensor

from shared.data import store as store_mod
from shared.data.sources import CorruptImagesError, CsvSource, FolderSource, SyntheticSource
from shared.data.store import ImageStore, build_store
from shared.data.synthetic import SyntheticProducts, SyntheticProductsSpec


def ShopeeCsv(*args, **kwargs) -> CsvSource:  # noqa: N802  (reads as the class it builds)
    """A CsvSource of Shopee-format postings (posting_id, image, label_group)."""
    return CsvSource(*args, label_col="label_group", id_col="posting_id", **kwargs)


S = 16  # store image size used throughout
TINY_SYNTH = dict(num_families=3, groups_per_family=2, min_instances=2, max_instances=3,
                  image_size=32)  # fmt: skip


def _rgb(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _reference(path: Path, size: int) -> torch.Tensor:
    """decode_image semantics written out: RGB, shorter side -> size (bicubic), centre crop.
    Images whose shorter side already equals `size` are cropped in numpy, no PIL resize."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        if min(w, h) != size:
            scale = size / min(w, h)
            w, h = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((w, h), Image.BICUBIC)
        a = np.asarray(img)
    top, left = (h - size) // 2, (w - size) // 2
    return torch.from_numpy(a[top : top + size, left : left + size].copy()).permute(2, 0, 1)


# name -> (class, (height, width), mode): mixed sizes and modes, shorter side mostly == S.
FOLDER_FILES = {
    "cat/a.png": ((S, 24), "RGB"),
    "cat/b.png": ((S, S), "L"),  # greyscale: stored as 3 equal channels
    "dog/c.png": ((30, S), "RGB"),  # tall: vertical centre crop
    "dog/d.png": ((32, 48), "RGB"),  # needs a resize (scale 1/2) then a crop
    "dog/e.png": ((S, 21), "RGBA"),  # odd margin: crop offset floors
    "eel/f.png": ((S, S), "RGB"),
    "eel/g.png": ((20, 20), "RGB"),
}


def _write(path: Path, shape, mode: str, seed: int, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(_rgb(seed, *shape))
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
    img.save(path, format=fmt)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "folder"
    for i, (name, (shape, mode)) in enumerate(FOLDER_FILES.items()):
        _write(root / name, shape, mode, seed=i)
    (root / "cat" / "notes.txt").write_text("not an image")  # ignored: wrong extension
    return root


@pytest.fixture
def shop(tmp_path) -> Path:
    """A Shopee-style CSV: posting_id,image,label_group (+ an extra column)."""
    root = tmp_path / "shop"
    rows = [("p3", "x.png", "100"), ("p1", "sub/y.png", "7"), ("p2", "z.jpg", "100"),
            ("p0", "w.png", "42")]  # fmt: skip
    for i, (_, image, _) in enumerate(rows):
        _write(root / "images" / image, (S, S + 2 * i), "RGB", seed=10 + i)
    _write_csv(
        root / "train.csv",
        ["posting_id", "image", "label_group", "title"],
        [(*r, f"title {i}") for i, r in enumerate(rows)],
    )
    return root


def _write_csv(path: Path, header, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _build(source, root, size=S, **kw) -> ImageStore:
    return build_store(source, root, size, progress=False, **kw)


def _complete_stores(root: Path) -> list[Path]:
    return [p.parent for p in root.rglob("meta.json") if (p.parent / "tensors").is_dir()]


# --- contents ----------------------------------------------------------------------------


def test_folder_store_matches_files(folder, tmp_path):
    store = _build(FolderSource(str(folder)), tmp_path / "stores", chunk_size=3)
    names = list(FOLDER_FILES)
    assert store.ids == names
    assert store.meta["class_names"] == ["cat", "dog", "eel"] and store.num_classes == 3
    assert store.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert store.meta["class_counts"] == [2, 3, 2] and store.meta["num_skipped"] == 0
    assert store.images.shape == (7, 3, S, S) and store.images.dtype == torch.uint8
    ref = torch.stack([_reference(folder / n, S) for n in names])
    assert torch.equal(store.images[:], ref)
    # The greyscale file is three equal channels; the odd-margin crop floors its offset.
    assert torch.equal(store.images[1, 0], store.images[1, 2])
    a = np.asarray(Image.open(folder / "dog/e.png").convert("RGB"))
    assert torch.equal(store.images[4], torch.from_numpy(a[:, 2 : 2 + S].copy()).permute(2, 0, 1))
    assert torch.equal(store.tensors["row"][:], torch.arange(7))
    assert len(store) == 7 and store.meta["num_images"] == 7


def test_csv_store_matches_files(shop, tmp_path):
    src = ShopeeCsv(str(shop / "train.csv"), image_dir=str(shop / "images"))
    store = _build(src, tmp_path / "stores")
    assert store.ids == ["p3", "p1", "p2", "p0"]  # CSV order, ids from posting_id
    assert store.meta["class_names"] == ["100", "42", "7"]  # sorted label_group strings
    assert store.labels.tolist() == [0, 2, 0, 1]
    images = ["x.png", "sub/y.png", "z.jpg", "w.png"]
    ref = torch.stack([_reference(shop / "images" / n, S) for n in images])
    assert torch.equal(store.images[:], ref)


def test_csv_of_image_and_label_is_the_default_form(shop, tmp_path):
    """The README's `data/source=csv data.source.csv_path=...`: a CSV of image,label."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    csv_path = _write_csv(
        shop / "images" / "plain.csv", ["image", "label"], [("x.png", "cat"), ("w.png", "dog")]
    )
    conf = OmegaConf.load(Path(__file__).parents[3] / "conf" / "data" / "source" / "csv.yaml")
    src = instantiate(conf, csv_path=str(csv_path))
    assert src.class_names == ["cat", "dog"] and src.labels.tolist() == [0, 1]
    assert src.ids == ["x.png", "w.png"]  # no id column: the image path is the id


def test_csv_groups_reach_the_store_and_the_group_split(shop, tmp_path):
    csv_path = _write_csv(
        shop / "images" / "grouped.csv",
        ["image", "label", "item"],
        [
            ("x.png", "a", "i1"),
            ("w.png", "a", "i1"),
            ("z.jpg", "b", "i2"),
            ("sub/y.png", "b", "i3"),
        ],
    )
    src = CsvSource(str(csv_path), group_col="item")
    store = _build(src, tmp_path / "stores")
    assert store.groups == ["i1", "i1", "i2", "i3"]
    plain = _build(CsvSource(str(csv_path)), tmp_path / "stores")
    assert plain.path != store.path and plain.groups is None  # group_col is part of the key
    with pytest.raises(ValueError, match="lacks required column") as info:
        CsvSource(str(csv_path), group_col="sku")
    assert "'sku'" in str(info.value)


def test_csv_image_dir_defaults_to_csv_folder(shop, tmp_path):
    csv_path = _write_csv(
        shop / "images" / "local.csv",
        ["posting_id", "image", "label_group"],
        [("a", "x.png", "1"), ("b", "w.png", "2")],
    )
    src = ShopeeCsv(str(csv_path))
    assert src.paths == [shop / "images" / "x.png", shop / "images" / "w.png"]


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory) -> ImageStore:
    root = tmp_path_factory.mktemp("synth")
    return _build(SyntheticSource(**TINY_SYNTH), root, size=32, chunk_size=5)


def test_synthetic_store_matches_render(synth_store):
    products = SyntheticProducts(SyntheticProductsSpec(**TINY_SYNTH))
    n = len(products)
    assert len(synth_store) == n and 6 <= n <= 18
    assert torch.equal(synth_store.images[:], products.render(range(n)))
    assert torch.equal(synth_store.labels[:], products.labels)
    assert synth_store.meta["class_names"] == [str(c) for c in range(6)]
    assert synth_store.ids == [f"p{i:07d}" for i in range(n)] and len(set(synth_store.ids)) == n
    assert synth_store.meta["source"]["kind"] == "synthetic"
    assert "generator_version" in synth_store.meta["source"]


def test_store_is_memory_mapped(folder, tmp_path):
    store = _build(FolderSource(str(folder)), tmp_path / "stores")
    assert isinstance(store.images, MemoryMappedTensor)
    assert isinstance(store.labels, MemoryMappedTensor)
    assert Path(store.images.filename).is_relative_to(store.path)
    again = ImageStore.open(store.path)
    assert isinstance(again.images, MemoryMappedTensor)
    assert torch.equal(again.images[:], store.images[:])


# --- reuse and keys ----------------------------------------------------------------------


def test_second_build_reuses(folder, tmp_path, monkeypatch):
    root = tmp_path / "stores"
    first = _build(FolderSource(str(folder)), root)
    stamp = (first.path / "meta.json").stat().st_mtime_ns
    src = FolderSource(str(folder))

    def no_decoding(*args, **kwargs):
        raise AssertionError("a store that exists must not be rebuilt")

    monkeypatch.setattr(src, "load", no_decoding)
    second = _build(src, root)
    assert second.path == first.path
    assert (second.path / "meta.json").stat().st_mtime_ns == stamp
    assert torch.equal(second.images[:], first.images[:])
    assert [p.name for p in root.iterdir()] == [first.path.name]


def test_key_changes_with_size_and_source(folder, tmp_path):
    root = tmp_path / "stores"
    base = _build(FolderSource(str(folder)), root)
    bigger = _build(FolderSource(str(folder)), root, size=S + 4)
    assert bigger.path != base.path and bigger.images.shape[-1] == S + 4
    assert base.path.name.startswith("store-") and base.meta["key"] in base.path.name

    _write(folder / "eel" / "h.png", (S, S), "RGB", seed=99)  # one more file
    grown = _build(FolderSource(str(folder)), root)
    assert grown.path not in (base.path, bigger.path) and len(grown) == len(base) + 1

    named = _build(FolderSource(str(folder)), root, name="other")
    assert named.path.name == f"other-{grown.meta['key']}"
    assert len(_complete_stores(root)) == 4


def test_csv_key_follows_image_contents(shop, tmp_path):
    """Rewriting an image (CSV untouched) must give a new store with the new pixels."""
    root = tmp_path / "stores"
    csv_path, images = str(shop / "train.csv"), str(shop / "images")
    before = _build(ShopeeCsv(csv_path, image_dir=images), root)
    _write(shop / "images" / "x.png", (S, S), "RGB", seed=1234)
    after = _build(ShopeeCsv(csv_path, image_dir=images), root)
    assert after.path != before.path
    assert torch.equal(after.images[0], _reference(shop / "images" / "x.png", S))
    assert not torch.equal(after.images[0], before.images[0])


def test_synthetic_key_follows_spec(synth_store):
    def key(size=32, **changes):
        return store_mod.store_key(SyntheticSource(**{**TINY_SYNTH, **changes}).describe(), size)

    assert key() == synth_store.meta["key"]
    others = {key(seed=1), key(nuisance=0.5), key(image_size=48), key(size=S)}
    assert len(others) == 4 and synth_store.meta["key"] not in others


def test_synthetic_store_at_other_sizes(tmp_path):
    """A store size other than the spec's renders the same products at that size; one
    source object serves several sizes in turn."""
    spec = {**TINY_SYNTH, "num_families": 1}
    src = SyntheticSource(**spec)
    for size in (S, 24):
        store = _build(src, tmp_path, size=size)
        products = SyntheticProducts(SyntheticProductsSpec(**{**spec, "image_size": size}))
        assert torch.equal(store.images[:], products.render(range(len(store))))
        assert torch.equal(store.labels[:], products.labels)
    assert len(_complete_stores(tmp_path)) == 2


def test_pinned_path_with_other_store_is_rebuilt(folder, tmp_path, caplog):
    fixed = tmp_path / "pinned"
    shop = tmp_path / "shop"
    _write(shop / "x.png", (S, S), "RGB", seed=0)
    csv_path = _write_csv(
        shop / "a.csv", ["posting_id", "image", "label_group"], [("p", "x.png", "1")]
    )
    other = _build(ShopeeCsv(str(csv_path)), tmp_path, path=fixed)
    assert other.path == fixed and other.meta["source"]["kind"] == "csv"

    with caplog.at_level(logging.WARNING, logger=store_mod.__name__):
        store = _build(FolderSource(str(folder)), tmp_path, path=fixed)
    assert store.path == fixed
    assert store.meta["source"]["kind"] == "folder" and store.ids == list(FOLDER_FILES)
    ref = torch.stack([_reference(folder / n, S) for n in FOLDER_FILES])
    assert torch.equal(store.images[:], ref)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "rebuilding" in warned[-1].getMessage()
    assert str(fixed) in warned[-1].getMessage()

    caplog.clear()  # same source, other size at the pinned path: rebuilt too
    with caplog.at_level(logging.WARNING, logger=store_mod.__name__):
        resized = _build(FolderSource(str(folder)), tmp_path, size=S + 2, path=fixed)
    assert resized.images.shape[-1] == S + 2 and resized.meta["key"] != store.meta["key"]
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    # ...and the matching store at the pinned path is reused without a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=store_mod.__name__):
        again = _build(FolderSource(str(folder)), tmp_path, size=S + 2, path=fixed)
    assert again.meta["key"] == resized.meta["key"] and not caplog.records
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "pinned", "shop"]  # no temps


# --- interrupted builds ------------------------------------------------------------------


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_killed_build_leaves_nothing_complete(folder, tmp_path, monkeypatch, exc):
    root = tmp_path / "stores"
    src = FolderSource(str(folder))
    real_load, calls = src.load, []

    def dies_on_second_chunk(indices, size):
        calls.append(list(indices))
        if len(calls) == 2:
            raise exc
        return real_load(indices, size)

    monkeypatch.setattr(src, "load", dies_on_second_chunk)
    with pytest.raises(type(exc)):
        _build(src, root, chunk_size=2)
    assert calls == [[0, 1], [2, 3]]
    assert _complete_stores(root) == []
    assert list(root.iterdir()) == []  # neither the final nor the temporary directory

    monkeypatch.undo()
    store = _build(FolderSource(str(folder)), root, chunk_size=2)
    assert len(store) == len(FOLDER_FILES) and _complete_stores(root) == [store.path]


def test_stale_partial_directory_is_not_a_store(folder, tmp_path):
    """What a SIGKILLed build leaves (a temp dir without meta.json) never opens as a store
    and does not stop the next build."""
    root = tmp_path / "stores"
    key = store_mod.store_key(FolderSource(str(folder)).describe(), S)
    stale = root / f".store-{key}.tmp-999999"
    (stale / "tensors").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="not a complete image store"):
        ImageStore.open(stale)
    partial = root / f"store-{key}"  # a final-looking dir without meta.json is rebuilt
    (partial / "tensors").mkdir(parents=True)
    store = _build(FolderSource(str(folder)), root)
    assert store.path == partial and len(store) == len(FOLDER_FILES)


# --- bad input ---------------------------------------------------------------------------


def test_missing_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as info:
        FolderSource(str(missing))
    assert "data.source.root" in str(info.value) and str(missing) in str(info.value)


def test_root_without_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    _write(tmp_path / "flat" / "a.png", (S, S), "RGB", seed=0)
    with pytest.raises(ValueError, match="no class subfolders") as info:
        FolderSource(str(tmp_path / "flat"))
    assert str(tmp_path / "flat") in str(info.value)


def test_empty_class_folder_is_named(folder):
    (folder / "fox").mkdir()
    (folder / "fox" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="has no images") as info:
        FolderSource(str(folder))
    assert str(folder / "fox") in str(info.value)


@pytest.fixture
def folder_with_corrupt(folder) -> tuple[Path, list[str]]:
    (folder / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    _write(folder / "cat" / "trunc.jpg", (S, 40), "RGB", seed=7, fmt="JPEG")
    data = (folder / "cat" / "trunc.jpg").read_bytes()
    (folder / "cat" / "trunc.jpg").write_bytes(data[: len(data) // 2])
    return folder, ["cat/trunc.jpg", "dog/bad.png"]


def test_corrupt_files_are_listed(folder_with_corrupt, tmp_path):
    folder, bad = folder_with_corrupt
    with pytest.raises(CorruptImagesError) as info:
        _build(FolderSource(str(folder)), tmp_path / "stores", chunk_size=2)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert all(str(folder / b) in msg for b in bad) and msg.startswith("2 image file(s)")
    assert "skip_corrupt" in msg
    assert list((tmp_path / "stores").iterdir()) == []


def test_skip_corrupt_drops_rows_and_keeps_them_aligned(folder_with_corrupt, tmp_path):
    folder, bad = folder_with_corrupt
    src = FolderSource(str(folder), skip_corrupt=True)
    all_ids = list(src.ids)
    store = _build(src, tmp_path / "stores", chunk_size=2)  # bad rows in different chunks
    good = [i for i in all_ids if i not in bad]
    assert store.meta["num_skipped"] == 2 and len(store) == len(good) == 7
    assert store.meta["num_images"] == 7 and store.ids == good
    classes = store.meta["class_names"]
    assert [classes[c] for c in store.labels.tolist()] == [i.split("/")[0] for i in good]
    assert store.meta["class_counts"] == [2, 3, 2]
    assert store.tensors["row"].tolist() == [all_ids.index(i) for i in good]
    ref = torch.stack([_reference(folder / i, S) for i in good])
    assert torch.equal(store.images[:], ref)
    assert isinstance(store.images, MemoryMappedTensor)
    assert sorted(p.name for p in store.path.iterdir()) == ["meta.json", "tensors"]


def test_all_corrupt_with_skip_is_an_error(tmp_path):
    root = tmp_path / "broken"
    for name in ("a/x.png", "b/y.png"):
        (root / name).parent.mkdir(parents=True)
        (root / name).write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="all 2 images"):
        _build(FolderSource(str(root), skip_corrupt=True), tmp_path / "stores")
    assert list((tmp_path / "stores").iterdir()) == []


@pytest.mark.parametrize("column", ["label_group", "posting_id", "image"])
def test_csv_missing_column(shop, column):
    header = [c for c in ("posting_id", "image", "label_group") if c != column]
    path = _write_csv(shop / "bad.csv", header, [["v"] * len(header)])
    with pytest.raises(ValueError, match="lacks required column") as info:
        ShopeeCsv(str(path), image_dir=str(shop / "images"))
    assert repr(column) in str(info.value) and str(path) in str(info.value)


def test_csv_duplicated_posting_id(shop):
    path = _write_csv(
        shop / "dup.csv",
        ["posting_id", "image", "label_group"],
        [("p1", "x.png", "1"), ("p9", "w.png", "1"), ("p1", "z.jpg", "2")],
    )
    with pytest.raises(ValueError, match="duplicated") as info:
        ShopeeCsv(str(path), image_dir=str(shop / "images"))
    assert "'posting_id'" in str(info.value) and "p1" in str(info.value)


def test_csv_image_missing_on_disk(shop):
    path = _write_csv(
        shop / "gone.csv",
        ["posting_id", "image", "label_group"],
        [("p1", "x.png", "1"), ("p2", "gone.png", "1")],
    )
    with pytest.raises(FileNotFoundError, match="missing") as info:
        ShopeeCsv(str(path), image_dir=str(shop / "images"))
    assert str(shop / "images" / "gone.png") in str(info.value)
    assert "1 image(s)" in str(info.value)


def test_csv_file_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source.csv_path"):
        ShopeeCsv(str(tmp_path / "none.csv"))
    path = _write_csv(tmp_path / "empty.csv", ["posting_id", "image", "label_group"], [])
    with pytest.raises(ValueError, match="no rows"):
        ShopeeCsv(str(path))


@pytest.mark.parametrize("tensor", ["images", "labels"])
def test_a_truncated_store_is_rebuilt_not_reused(tmp_path, caplog, tensor):
    """A copy cut short (full disk, killed rsync) has a valid meta.json; reusing it would
    train on zero-filled images. It is rebuilt, with a warning naming the file."""
    source = SyntheticSource(num_families=2, groups_per_family=2, image_size=S, seed=3)
    first = _build(source, tmp_path)
    reference = first.images[:].clone()
    file = first.path / "tensors" / f"{tensor}.memmap"
    size = file.stat().st_size
    del first
    with open(file, "r+b") as f:
        f.truncate(size // 3)
    with caplog.at_level(logging.WARNING):
        again = _build(source, tmp_path)
    assert f"{tensor}.memmap holds {size // 3} bytes, expected {size}" in caplog.text
    assert torch.equal(again.images[:], reference)


def test_a_store_is_on_disk_before_it_is_published(tmp_path, monkeypatch):
    """Every file and folder of a new store is fsynced while it still has its temporary
    name, so a crash after the rename never finds a store whose data never reached disk."""
    import shared.data.publish as publish_mod

    synced, real_fsync = [], os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(publish_mod.os, "fsync", spy)
    store = _build(SyntheticSource(num_families=2, groups_per_family=2, image_size=S), tmp_path)
    names = {Path(p).name for p in synced}
    assert {"images.memmap", "labels.memmap", "row.memmap", "meta.json"} <= names
    assert any(Path(p).name.startswith(f".{store.path.name}.tmp") for p in synced)  # folders
    assert all(f".{store.path.name}.tmp" in p for p in synced)  # before the rename


def test_every_source_kind_keeps_the_source_contract(tmp_path):
    """The store reads sources through `Source`: the built-in kinds have every member, and
    an object without them is refused by name before any build starts."""
    import pytest

    from shared.data.sources import Source, SyntheticSource, check_source
    from shared.data.store import build_store

    synthetic = SyntheticSource(num_families=2, groups_per_family=2, image_size=16)
    assert isinstance(synthetic, Source)
    check_source(synthetic)

    class Half:
        labels, ids = [0], ["a"]

        def load(self, indices, size):
            raise AssertionError("never read")

    with pytest.raises(TypeError, match=r"Half is not a data source: it lacks \['class_names'"):
        build_store(Half(), tmp_path, 16)


def _flip_byte(file: Path, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_store_whose_bytes_changed_is_rebuilt_and_the_full_check_finds_any_change(
    tmp_path, caplog, monkeypatch
):
    """Same sizes, other bytes (bit rot, a partial overwrite): a sampled block that changed
    rebuilds the store on reuse; `python -m shared.data.store --check` reads every byte."""
    import shared.data.store as store_mod
    from shared.data.store import main

    # blocks small enough that this tiny store has bytes the sampling skips
    monkeypatch.setattr(store_mod, "BLOCK", 256)
    monkeypatch.setattr(store_mod, "SAMPLED_BLOCKS", 4)
    BLOCK = 256

    source = SyntheticSource(num_families=2, groups_per_family=2, image_size=S, seed=3)
    first = _build(source, tmp_path)
    path, reference = first.path, first.images[:].clone()
    images = path / "tensors" / "images.memmap"
    size = images.stat().st_size
    assert size > 3 * BLOCK  # blocks the sampling skips exist
    del first
    assert main(["--check", str(path)]) == 0

    _flip_byte(images, size - BLOCK - 1)  # just before the last sampled block
    assert _build(source, tmp_path).path == path and "damaged" not in caplog.text  # not read
    assert main(["--check", str(path)]) == 1  # the full check finds it

    _flip_byte(images, 0)  # inside the first sampled block
    with caplog.at_level(logging.WARNING):
        again = _build(source, tmp_path)
    assert "images.memmap does not match its sampled_sha256 recorded at publish" in caplog.text
    assert torch.equal(again.images[:], reference)
    assert main(["--check", str(again.path)]) == 0
