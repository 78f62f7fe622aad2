"""The shard store (litdata chunks of encoded images) against the memmap store of the same
source: rows, labels, ids, groups, titles, pixels (exact with PNG; JPEG: PIL's own round
trip of the memmap pixels), splits; reuse, rebuild, damage and interrupted builds.

Builds here start litdata's workers by fork (the tests run torch on one thread, where fork
is safe): the same code as the default spawn, without seconds of interpreter start-up per
build. The command-line runs at the end use the default.
"""

from __future__ import annotations

import io
import json
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from shared.data import shards as shards_mod
from shared.data.datamodule import StoreDataModule
from shared.data.shards import ShardStore, build_shard_store
from shared.data.sources import CorruptImagesError, CsvSource, SyntheticSource, decode_whole
from shared.data.store import build_store, main
from tests.shared.data.test_data_store import _write, _write_csv

S = 16
SYNTH = dict(num_families=3, groups_per_family=2, min_instances=2, max_instances=3, image_size=S)


def _shards(source, root, **kw) -> ShardStore:
    kw = {"image_size": S, "workers": 1, "start_method": "fork", **kw}
    return build_shard_store(source, root, **kw)


def _sample(store: ShardStore, i: int) -> dict:
    """Sample `i` as litdata reads it back."""
    from litdata import StreamingDataset

    return StreamingDataset(str(store.path))[i]


def _jpeg_round_trip(images: torch.Tensor, quality: int) -> torch.Tensor:
    """What PIL's encoder and decoder make of uint8 [n,3,S,S] images at `quality`."""
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=quality)
        out.append(torch.from_numpy(np.array(Image.open(buffer).convert("RGB"))).permute(2, 0, 1))
    return torch.stack(out)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The memmap and the PNG and JPEG shard stores of one synthetic source."""
    root = tmp_path_factory.mktemp("synthetic")
    source = SyntheticSource(**SYNTH)
    memmap = build_store(source, root, S, progress=False)
    png = _shards(source, root, fmt="png")
    # two workers sharing tasks of 2 rows: samples land out of row order, rows must not
    rows_per_task, shards_mod.ROWS_PER_TASK = shards_mod.ROWS_PER_TASK, 2
    try:
        jpeg = _shards(source, root, fmt="jpeg", quality=80, workers=2, chunk_bytes="3kB")
    finally:
        shards_mod.ROWS_PER_TASK = rows_per_task
    assert len(list(jpeg.path.glob("chunk-*.bin"))) > 2
    return root, source, memmap, png, jpeg


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A CSV of PNG and JPEG files of several sizes and aspects, with groups and titles."""
    root = tmp_path_factory.mktemp("shop")
    shapes = [(S, 24), (30, S), (32, 48), (S, S), (40, 20), (S, 21)]
    rows = []
    for i, shape in enumerate(shapes):
        name = f"{i}.{'jpg' if i % 2 else 'png'}"
        _write(root / name, shape, "RGB", seed=i, fmt="JPEG" if i % 2 else "PNG")
        rows.append((f"p{i}", name, str(i % 3), f"g{i // 2}", f"title {i}"))
    header = ["posting_id", "image", "label_group", "phash", "title"]
    csv_path = _write_csv(root / "train.csv", header, rows)
    return CsvSource(str(csv_path), label_col="label_group", id_col="posting_id", group_col="phash")


# --- contents ----------------------------------------------------------------------------


def test_synthetic_shards_hold_the_memmap_rows_and_pixels(synthetic):
    _, source, memmap, png, jpeg = synthetic
    for store in (png, jpeg):
        assert store.ids == memmap.ids and store.groups is None
        assert torch.equal(store.labels, memmap.labels)
        assert store.titles == source.titles
        assert store.num_classes == memmap.num_classes and len(store) == len(memmap)
    assert torch.equal(png.images[:], memmap.images[:])  # lossless
    assert torch.equal(jpeg.images[:], _jpeg_round_trip(memmap.images[:], 80))
    assert not torch.equal(jpeg.images[:], memmap.images[:])  # the JPEG error is real
    rows = torch.tensor([3, 0, 3])
    assert torch.equal(png.images[rows], memmap.images[rows])  # any rows, repeats, order
    assert torch.equal(png.images[2], memmap.images[2])


def test_csv_shards_hold_the_memmap_rows_and_pixels(shop, tmp_path):
    memmap = build_store(shop, tmp_path, S, progress=False)
    png = _shards(shop, tmp_path, fmt="png")
    assert png.ids == memmap.ids == [f"p{i}" for i in range(6)]
    assert png.groups == memmap.groups == shop.groups
    assert png.titles == shop.titles and torch.equal(png.labels, memmap.labels)
    assert torch.equal(png.images[:], memmap.images[:])
    # stored whole, at its own aspect: the shorter side is S, the longer one kept
    sample = _sample(png, 4)  # a 40 x 20 file
    with Image.open(io.BytesIO(sample["image"])) as img:
        assert img.size == (S, 32) and img.format == "PNG"
    assert sample["id"] == "p4" and sample["group"] == "g2" and sample["title"] == "title 4"

    jpeg = _shards(shop, tmp_path, fmt="jpeg", quality=90)
    wholes = [decode_whole(p, S) for p in shop.paths]
    expected = []
    for whole in wholes:  # PIL's round trip of the whole image, then the centre crop
        buffer = io.BytesIO()
        whole.save(buffer, "JPEG", quality=90)
        img = np.array(Image.open(buffer).convert("RGB"))
        top, left = (img.shape[0] - S) // 2, (img.shape[1] - S) // 2
        expected.append(torch.from_numpy(img[top : top + S, left : left + S]).permute(2, 0, 1))
    assert torch.equal(jpeg.images[:], torch.stack(expected))


def test_a_larger_shorter_side_is_stored_larger_and_read_resized(synthetic):
    """Stored at 2S, read at S: the source's 2S render, bicubic-resized to S by PIL."""
    root, source, memmap, png, _ = synthetic
    big = _shards(source, root, fmt="png", shorter_side=2 * S)
    assert big.path != png.path and big.meta["shorter_side"] == 2 * S
    with Image.open(io.BytesIO(_sample(big, 0)["image"])) as img:
        assert img.size == (2 * S, 2 * S)
    renders, _ = source.load(list(range(len(source))), 2 * S)
    expected = torch.stack([
        torch.from_numpy(np.array(
            Image.fromarray(r.permute(1, 2, 0).numpy()).resize((S, S), Image.BICUBIC)
        )).permute(2, 0, 1)
        for r in renders
    ])  # fmt: skip
    assert torch.equal(big.images[:], expected)
    assert big.ids == memmap.ids and torch.equal(big.labels, memmap.labels)


def test_splits_and_loader_batches_equal_the_memmap_stores(synthetic):
    root = synthetic[0]
    modules = {}
    for kind in ("memmap", "shards"):
        dm = StoreDataModule(
            SyntheticSource(**SYNTH), str(root), image_size=S, batch_size=4, num_workers=2,
            store_kind=kind, shard_format="png", shard_workers=1, val_fraction=0.5,
            test_fraction=0.0,
        )  # fmt: skip
        dm.setup()
        modules[kind] = dm
    memmap, shards = modules["memmap"], modules["shards"]
    assert shards.store.path == synthetic[3].path  # the fixture's store, reused
    for name in ("train_indices", "val_indices", "test_indices"):
        assert np.array_equal(getattr(shards, name), getattr(memmap, name))
    for a, b in zip(memmap.val_dataloader()["query"], shards.val_dataloader()["query"]):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


# --- keys, damage, interruption ----------------------------------------------------------


def test_a_changed_setting_rebuilds_at_a_pinned_path(synthetic, tmp_path, caplog):
    source = synthetic[1]
    pinned = tmp_path / "pinned"
    png = _shards(source, tmp_path, fmt="png", path=pinned)
    with caplog.at_level(logging.WARNING):
        jpeg = _shards(source, tmp_path, fmt="jpeg", quality=70, path=pinned)
    assert jpeg.path == pinned and jpeg.meta["key"] != png.meta["key"]
    assert "rebuilding" in caplog.text and str(pinned) in caplog.text
    assert torch.equal(jpeg.images[:], _jpeg_round_trip(synthetic[2].images[:], 70))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = _shards(source, tmp_path, fmt="jpeg", quality=70, path=pinned)
    assert again.meta["key"] == jpeg.meta["key"] and not caplog.records  # reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pinned"]  # no temporary dirs


def test_a_truncated_chunk_is_named_then_rebuilt(synthetic, tmp_path, caplog):
    source = synthetic[1]
    store = _shards(source, tmp_path, fmt="png", chunk_bytes="2kB")
    reference = store.images[:]
    chunks = sorted(store.path.glob("chunk-*.bin"))
    assert len(chunks) > 2  # several chunks, one cut short
    chunk = chunks[1]
    size = chunk.stat().st_size
    with open(chunk, "r+b") as f:
        f.truncate(size // 2)
    message = f"{chunk.name} holds {size // 2} bytes, expected {size}"
    assert main(["--check", str(store.path)]) == 1
    fresh = ShardStore.open(store.path, S)  # a reader that opened it before the check
    rows = [i for i in range(len(fresh)) if _chunk_of(fresh, i) == chunk.name]
    with pytest.raises(RuntimeError, match=message):
        fresh.images[rows[-1]]
    with caplog.at_level(logging.WARNING):
        again = _shards(source, tmp_path, fmt="png", chunk_bytes="2kB")
    assert message in caplog.text and "rebuilding" in caplog.text
    assert torch.equal(again.images[:], reference)
    assert main(["--check", str(again.path)]) == 0


def _chunk_of(store: ShardStore, row: int) -> str:
    """The chunk file litdata's index puts `row` in (chunks in index order)."""
    import json

    index = json.loads((store.path / "index.json").read_text())
    start = 0
    for chunk in index["chunks"]:
        if row < start + chunk["chunk_size"]:
            return chunk["filename"]
        start += chunk["chunk_size"]
    raise IndexError(row)


@pytest.mark.parametrize("where", ["worker", "after_chunks"])
def test_an_interrupted_build_leaves_nothing(synthetic, tmp_path, monkeypatch, where):
    """A failure inside litdata's worker, or an interrupt once the chunks are written: no
    store, no temporary directory; the next build succeeds."""
    source = synthetic[1]
    if where == "worker":  # the forked worker inherits the patch
        monkeypatch.setattr(shards_mod._EncodeRows, "_encode", _disk_on_fire)
        expected = RuntimeError
    else:
        real = shards_mod._stored_rows

        def interrupted(path):
            assert list(path.glob("chunk-*.bin"))
            real(path)
            raise KeyboardInterrupt

        monkeypatch.setattr(shards_mod, "_stored_rows", interrupted)
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        _shards(source, tmp_path, fmt="png")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    store = _shards(source, tmp_path, fmt="png")
    assert [p.name for p in tmp_path.iterdir()] == [store.path.name]


def _disk_on_fire(self, image):
    raise OSError("disk on fire")


# --- bad input ---------------------------------------------------------------------------


def test_corrupt_files_are_listed_or_skipped_keeping_rows_aligned(shop, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good_paths = list(shop.paths)
    shop.paths = [*good_paths[:2], bad, *good_paths[3:]]
    try:
        with pytest.raises(CorruptImagesError, match="bad.png"):
            _shards(shop, tmp_path / "a", fmt="png")
        assert list((tmp_path / "a").iterdir()) == []
        shop.skip_corrupt = True
        memmap = build_store(shop, tmp_path / "m", S, progress=False)
        store = _shards(shop, tmp_path / "b", fmt="png")
        assert store.ids == memmap.ids == ["p0", "p1", "p3", "p4", "p5"]
        assert store.groups == memmap.groups and torch.equal(store.labels, memmap.labels)
        assert store.titles == [shop.titles[i] for i in (0, 1, 3, 4, 5)]
        assert torch.equal(store.images[:], memmap.images[:])
        assert store.meta["num_skipped"] == 1
    finally:
        shop.paths, shop.skip_corrupt = good_paths, False


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(store_kind="disk"), "data.store_kind='disk' is not one of"),
        (dict(shard_format="gif"), "data.shard_format='gif' is not one of"),
        (dict(shard_quality=0), "data.shard_quality=0 must be an integer in 1..100"),
        (dict(shard_shorter_side=8), "data.shard_shorter_side=8 is below data.image_size=16"),
    ],
)
def test_bad_settings_are_named_before_any_build(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        StoreDataModule(
            SyntheticSource(**SYNTH), str(tmp_path), image_size=S,
            **{"store_kind": "shards", **settings},
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


# --- both pipelines from the command line ------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["ssl", "matching"])
def test_both_pipelines_train_from_shards_as_from_memmap(pipeline, tmp_path):
    """With lossless shards the run sees the memmap store's pixels, splits and batches:
    its metrics are the memmap run's."""
    from tests.pipelines import cli, run, run_dir

    metrics = {}
    for kind in ("memmap", "shards"):
        out = tmp_path / kind
        result = run(cli(pipeline, out, f"data.store_kind={kind}", "data.shard_format=png"))
        assert result.returncode == 0, result.stderr[-3000:]
        metrics[kind] = _metric_rows(run_dir(pipeline, out) / "csv" / "metrics.csv")
    assert metrics["shards"] == metrics["memmap"] and metrics["memmap"]
    assert list((tmp_path / "shards" / "data" / "stores").glob("*-shards-*/index.json"))


@pytest.mark.slow
def test_dino_trains_from_kept_jpegs_of_any_aspect(tmp_path):
    """A class folder of JPEGs of several aspects, kept as given: DINO crops each image whole
    and evaluates its centre squares, from the command line."""
    from tests.pipelines import SCRIPTS, SHORT, TINY, _replace, run, run_dir

    root = tmp_path / "photos"
    shapes = [(40, 24), (24, 48), (32, 32), (30, 50), (56, 28), (26, 36)]
    for c in range(4):
        for i, shape in enumerate(shapes):
            _write(root / f"class{c}" / f"{i}.jpg", shape, "RGB", seed=10 * c + i, fmt="JPEG")
    ssl_only = [o for o in TINY["ssl"] if not o.startswith("data.source.")]
    cmd = [
        *_replace(ssl_only, "data.image_size=24", "data.batch_size=8"),
        *SHORT,
        "data/source=folder",
        f"data.source.root={root}",
        "data.store_kind=shards",
        "data.shard_format=keep",
        "module.multicrop.global_size=24",
        "module.multicrop.local_size=12",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    from tests.conftest import REPO

    result = run([sys.executable, str(REPO / SCRIPTS["ssl"]), *cmd])
    assert result.returncode == 0, result.stderr[-3000:]
    (meta,) = (tmp_path / "data" / "stores").glob("*-shards-*/meta.json")
    assert json.loads(meta.read_text())["format"] == "keep"
    rows = _metric_rows(run_dir("ssl", tmp_path) / "csv" / "metrics.csv")
    assert any(r.get("val/knn_top1@20") for r in rows)


def _metric_rows(path) -> list[dict]:
    import csv

    with open(path) as f:
        return [{k: v for k, v in row.items() if "time" not in k} for row in csv.DictReader(f)]


def test_a_build_leaves_the_global_random_states_as_they_were(synthetic, tmp_path):
    """litdata's optimize seeds Python's, numpy's and torch's RNGs with 42; a run's training
    must not depend on whether its store was just built."""
    import random

    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    _shards(synthetic[1], tmp_path, fmt="png")
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]


def test_webp_shards_are_lossless(synthetic, tmp_path):
    from PIL import features

    if not features.check("webp"):
        pytest.skip("this Pillow has no WebP")
    store = _shards(synthetic[1], tmp_path, fmt="webp")
    assert torch.equal(store.images[:], synthetic[2].images[:])
    with Image.open(io.BytesIO(_sample(store, 0)["image"])) as img:
        assert img.format == "WEBP"


# ---- whole images at their own aspect; files kept as given --------------------------------


def test_whole_reads_give_the_stored_image_at_its_own_aspect(shop, tmp_path):
    """`whole` decodes what was stored (PNG: exactly the file's whole image at shorter side
    S); the square read is that image's centre crop, the evaluation view."""
    png = _shards(shop, tmp_path, fmt="png")
    wholes = png.images.whole(range(len(png)))
    for row, image in enumerate(wholes):
        expected = np.array(decode_whole(shop.paths[row], S))
        assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))
        h, w = image.shape[1:]
        top, left = (h - S) // 2, (w - S) // 2
        assert torch.equal(png.images[row], image[:, top : top + S, left : left + S])
    for image, path in zip(wholes, shop.paths):  # shorter side S, the file's aspect
        with Image.open(path) as img:
            w, h = img.size
        assert min(image.shape[1:]) == S and abs(image.shape[2] / image.shape[1] - w / h) < 0.1


def test_kept_files_are_stored_byte_for_byte(shop, tmp_path):
    keep = _shards(shop, tmp_path, fmt="keep")
    assert keep.meta["shorter_side"] is None and keep.meta["quality"] is None
    for i in range(len(keep)):
        sample = _sample(keep, i)
        row = int(sample["row"])
        assert sample["image"] == shop.paths[row].read_bytes()
    for row, path in enumerate(shop.paths):
        with Image.open(path) as img:  # whole: the file's own size; square: the eval view
            assert tuple(keep.images.whole([row])[0].shape[1:]) == img.size[::-1]
        expected = torch.from_numpy(np.array(decode_whole(path, S))).permute(2, 0, 1)
        h, w = expected.shape[1:]
        top, left = (h - S) // 2, (w - S) // 2
        assert torch.equal(keep.images[row], expected[:, top : top + S, left : left + S])


def test_keep_refuses_what_it_cannot_keep(shop, synthetic, tmp_path):
    with pytest.raises(ValueError, match="data.shard_shorter_side=32 re-encodes"):
        _shards(shop, tmp_path, fmt="keep", shorter_side=32)
    with pytest.raises(ValueError, match="keep stores image files as given.*SyntheticSource"):
        _shards(synthetic[1], tmp_path, fmt="keep")
    with pytest.raises(ValueError, match=r"data.shard_format='gif' is not one of"):
        _shards(shop, tmp_path, fmt="gif")
    # a BMP file is an image, but not one kept as given: the build names it
    Image.new("RGB", (20, 20)).save(shop.paths[2], format="BMP")
    try:
        with pytest.raises(CorruptImagesError, match=str(shop.paths[2])):
            _shards(shop, tmp_path / "bmp", fmt="keep")
    finally:
        _write(shop.paths[2], (32, 48), "RGB", seed=2, fmt="PNG")


def test_train_batches_crop_over_whole_images(shop, tmp_path):
    """A shard store's train loader pads whole images into a batch with their sizes; eval
    loaders keep the centre squares; the DINO multi-crop of that batch is each image's own."""
    from shared.data.augment import MultiCrop  # crops of padded batches: test_data_augment

    dm = StoreDataModule(
        shop, str(tmp_path), image_size=S, batch_size=6, val_fraction=0.5, test_fraction=0.0,
        store_kind="shards", shard_format="keep", drop_last=False,
    )  # fmt: skip
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    rows = batch["index"].tolist()
    for i, row in enumerate(rows):
        h, w = batch["sizes"][i].tolist()
        with Image.open(shop.paths[row]) as img:
            assert (w, h) == img.size
        assert torch.equal(batch["images"][i, :, :h, :w], dm.store.images.whole([row])[0])
    assert batch["images"].shape[2:] == tuple(batch["sizes"].max(0).values.tolist())
    query = next(iter(dm.val_dataloader()["query"]))
    assert "sizes" not in query and query["images"].shape[1:] == (3, S, S)

    crop = MultiCrop(global_size=12, local_size=6, n_local=2)
    views = crop(batch["images"], torch.Generator().manual_seed(0), batch["sizes"])
    assert [v.shape for v in views] == [(len(rows), 3, 12, 12)] * 2 + [(len(rows), 3, 6, 6)] * 2
