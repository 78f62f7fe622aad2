"""The shard store in object storage, against a real S3 server (SeaweedFS, started by the
`s3_server` fixture): a store published to a bucket reads back as the local store of the
same source, is reused, keeps litdata's cache under its bound, and each bad input (an
unreachable endpoint, a wrong key, a chunk deleted, overwritten or cut short) is named,
with nothing half-written left to be used.

Each test publishes under its own prefix; the local reference is built from the same source
with the same settings.
"""

from __future__ import annotations

import contextlib
import logging
import time

import pytest
import torch

from shared.data import shards as shards_mod
from shared.data.object_store import S3Location
from shared.data.shards import ShardStore, build_shard_store
from shared.data.sources import SyntheticSource
from shared.data.store import main
from tests.shared.data.seaweedfs import free_ports
from tests.shared.data.test_shards import SYNTH, S, _metric_rows


def _kw(tmp_path, **kw) -> dict:
    """Build settings: PNG (lossless), several chunks, fork-started workers (one torch thread)."""
    return {
        "image_size": S, "fmt": "png", "chunk_bytes": "2kB", "workers": 1,
        "start_method": "fork", "s3_cache_dir": str(tmp_path / "cache"), **kw,
    }  # fmt: skip


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The source and its store on local disk: the reference."""
    source = SyntheticSource(**SYNTH)
    root = tmp_path_factory.mktemp("local")
    return source, build_shard_store(source, root, **_kw(root))


def _objects(server, prefix: str) -> dict[str, int]:
    """name -> size of every object under `prefix`, as the server lists it."""
    listed = server.client().list_objects_v2(Bucket=server.bucket, Prefix=f"{prefix}/")
    return {o["Key"][len(prefix) + 1 :]: o["Size"] for o in listed.get("Contents", [])}


def _count_builds(monkeypatch) -> list[int]:
    """Count the encoding passes (litdata optimize calls) from here on."""
    calls, real = [], shards_mod._optimize
    monkeypatch.setattr(shards_mod, "_optimize", lambda *a: calls.append(1) or real(*a))
    return calls


def _record_requests(monkeypatch) -> list[tuple[str, str]]:
    """(operation, key) of every PutObject / DeleteObject our clients send, in order."""
    sent, real = [], S3Location.client

    def client(self):
        c = real(self)
        for op in ("PutObject", "DeleteObject"):
            c.meta.events.register(
                f"before-parameter-build.s3.{op}",
                lambda params, op=op, **_: sent.append((op, params["Key"].rsplit("/", 1)[-1])),
            )
        return c

    monkeypatch.setattr(S3Location, "client", client)
    return sent


# --- contents, reuse, cache --------------------------------------------------------------


def test_a_published_store_reads_back_as_the_local_one(local, s3_env, tmp_path, monkeypatch):
    source, reference = local
    sent = _record_requests(monkeypatch)
    store = build_shard_store(source, "s3://stores/published", **_kw(tmp_path))
    location = store.path
    assert str(location) == f"s3://stores/published/{reference.path.name}"  # same key, same name
    assert store.ids == reference.ids and torch.equal(store.labels, reference.labels)
    assert torch.equal(store.images[:], reference.images[:])
    rows = torch.tensor([7, 0, 7, 3])
    assert torch.equal(store.images[rows], reference.images[rows])
    # the bucket holds the files of a local store, of the sizes its meta.json records;
    # meta.json was put last, after the old one (if any) was deleted first; the local build
    # is gone
    local_files = {p.name for p in reference.path.iterdir()}
    objects = _objects(s3_env, location.prefix)
    assert objects.keys() == local_files
    assert all(objects[n] == c["size"] for n, c in store.meta["checksums"].items())
    puts = [key for op, key in sent if op == "PutObject"]
    assert sent[0] == ("DeleteObject", "meta.json") and puts[-1] == "meta.json"
    assert sorted(puts[:-1]) == sorted(n for n in local_files if n != "meta.json")
    assert list((tmp_path / "cache" / "builds").iterdir()) == []


def test_a_complete_store_is_reused_not_rebuilt(local, s3_env, tmp_path, monkeypatch):
    source, reference = local
    first = build_shard_store(source, "s3://stores/reuse", **_kw(tmp_path))
    builds = _count_builds(monkeypatch)
    for cache in ("cache", "other-machine"):  # this cache, or an empty one elsewhere
        again = build_shard_store(source, "s3://stores/reuse", **_kw(tmp_path / cache))
        assert again.meta == first.meta and torch.equal(again.images[:], reference.images[:])
    assert builds == []


def test_an_unfinished_upload_is_not_used_but_rebuilt(local, s3_env, tmp_path, monkeypatch):
    """An upload cut off before meta.json leaves a prefix no reader opens; the next build
    keeps its finished local build, uploads it again, and then the store is complete."""
    source, reference = local

    network = ["down"]

    def cut_off(params, **_):
        if network and params["Key"].endswith("chunk-0-2.bin"):
            raise ConnectionResetError("network gone")

    real = S3Location.client

    def client(self):
        c = real(self)
        c.meta.events.register("before-parameter-build.s3.PutObject", cut_off)
        return c

    monkeypatch.setattr(S3Location, "client", client)
    with pytest.raises(ConnectionResetError):
        build_shard_store(source, "s3://stores/unfinished", **_kw(tmp_path))
    location = f"s3://stores/unfinished/{reference.path.name}"
    prefix = location.removeprefix("s3://stores/")
    assert "meta.json" not in _objects(s3_env, prefix) and _objects(s3_env, prefix)
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        ShardStore.open(location, S)
    network.clear()
    builds = _count_builds(monkeypatch)
    store = build_shard_store(source, "s3://stores/unfinished", **_kw(tmp_path))
    assert builds == []  # the finished local build was kept and uploaded, not encoded again
    assert torch.equal(store.images[:], reference.images[:])
    assert "meta.json" in _objects(s3_env, prefix)


def test_reads_keep_the_cache_under_its_bound(local, s3_env, tmp_path):
    """Random-access reads (an evaluation's rows) of a store 2.5 times the cache bound:
    every chunk passes through the cache, which never holds more than the bound plus the
    one chunk being fetched (litdata evicts once a new chunk has landed)."""
    source, reference = local
    bound = 3500
    store = build_shard_store(source, "s3://stores/bounded", **_kw(tmp_path, s3_cache_size=bound))
    chunks = {n: c["size"] for n, c in store.meta["checksums"].items() if n.startswith("chunk")}
    assert sum(chunks.values()) > 2.5 * bound and max(chunks.values()) < bound / 2
    seen, peak = set(), 0
    for row in torch.randperm(len(store)).tolist() + list(range(len(store))):
        assert torch.equal(store.images[row], reference.images[row])
        cached = _sizes((tmp_path / "cache").rglob("chunk-*.bin"))
        seen |= cached.keys()
        peak = max(peak, sum(cached.values()))
    assert peak <= bound + max(chunks.values()) and seen == chunks.keys()


def _sizes(files) -> dict[str, int]:
    """name -> size of the `files` still there (litdata evicts from another thread)."""
    sizes = {}
    for file in files:
        with contextlib.suppress(FileNotFoundError):
            sizes[file.name] = file.stat().st_size
    return sizes


def test_a_loader_worker_reads_a_bucket_as_the_local_store(local, s3_env, tmp_path):
    """The data module over `s3://`, its batches read in a forked loader worker (its own
    reader and cache): the local store's images and labels of the rows it names."""
    from shared.data.datamodule import StoreDataModule

    source, reference = local
    build_shard_store(source, "s3://stores/loader", **_kw(tmp_path))  # fork: seconds sooner
    dm = StoreDataModule(
        source, "s3://stores/loader", image_size=S, eval_batch_size=2,
        num_workers=1, store_kind="shards", shard_format="png", shard_workers=1,
        shard_chunk_bytes="2kB", val_fraction=0.5, test_fraction=0.0,
        s3_cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    dm.setup()
    assert dm.store.meta["key"] == reference.meta["key"]  # published above, reused
    batches = list(dm.val_dataloader()["query"])
    assert len(batches) > 1
    assert torch.cat([b["index"] for b in batches]).tolist() == dm.val_indices.tolist()
    for batch in batches:
        assert torch.equal(batch["images"], reference.images[batch["index"]])
        assert torch.equal(batch["labels"], reference.labels[batch["index"]])


def test_open_streaming_iterates_a_bucket_in_a_seeded_order(local, s3_env, tmp_path):
    """The seam a streaming loader uses: `open_streaming(location, shuffle, seed)` over a
    bucket yields every sample once, in an order its seed fixes."""
    from shared.data.shards import open_streaming

    store = build_shard_store(local[0], "s3://stores/iterate", **_kw(tmp_path))
    orders = {
        seed: [int(x["row"]) for x in open_streaming(store.path, shuffle=True, seed=seed)]
        for seed in (1, 1, 2)
    }
    assert sorted(orders[1]) == list(range(len(store)))
    again = [int(x["row"]) for x in open_streaming(store.path, shuffle=True, seed=1)]
    assert again == orders[1] and orders[2] != orders[1]


# --- bad input ---------------------------------------------------------------------------


def test_an_unreachable_endpoint_is_named_within_seconds(local, s3_env, tmp_path):
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"cannot reach the S3 endpoint {endpoint}"):
        build_shard_store(local[0], "s3://stores/nowhere", **_kw(tmp_path, s3_endpoint=endpoint))
    assert time.monotonic() - start < 30
    assert not (tmp_path / "cache").exists()  # nothing built


@pytest.mark.parametrize(
    "variable, code",
    [("AWS_SECRET_ACCESS_KEY", "SignatureDoesNotMatch"), ("AWS_ACCESS_KEY_ID", "InvalidAccessKey")],
)
def test_wrong_credentials_name_the_bucket(local, s3_env, tmp_path, monkeypatch, variable, code):
    monkeypatch.setenv(variable, "wrong")
    with pytest.raises(PermissionError, match=f"access denied to bucket 'stores' .*{code}"):
        build_shard_store(local[0], "s3://stores/denied", **_kw(tmp_path))
    assert _objects(s3_env, "denied") == {} and not (tmp_path / "cache").exists()


def test_a_missing_bucket_is_named(local, s3_env, tmp_path):
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist at"):
        build_shard_store(local[0], "s3://no-such-bucket/x", **_kw(tmp_path))
    assert not (tmp_path / "cache").exists()


def _spoil(server, store: ShardStore, how: str) -> tuple[str, str]:
    """Delete, overwrite with garbage or cut short the store's second chunk in the bucket;
    (its name, what a check must say)."""
    name = sorted(n for n in store.meta["checksums"] if n.startswith("chunk"))[1]
    key, size = store.path.key(name), store.meta["checksums"][name]["size"]
    client = server.client()
    if how == "missing":
        client.delete_object(Bucket=server.bucket, Key=key)
        return name, f"{name} is missing from {store.path}"
    body = bytes(size) if how == "garbage" else client.get_object(
        Bucket=server.bucket, Key=key)["Body"].read()[: size // 2]  # fmt: skip
    client.put_object(Bucket=server.bucket, Key=key, Body=body)
    if how == "garbage":
        return name, f"{name} in {store.path} does not match its md5 recorded at publish"
    return name, f"{name} holds {size // 2} bytes in {store.path}, expected {size}"


@pytest.mark.parametrize("how", ["missing", "garbage", "truncated"])
def test_a_spoiled_chunk_is_named_then_rebuilt(local, s3_env, tmp_path, caplog, how):
    """A reader that opened the store before a chunk was spoiled fails naming it (not a
    hang); the next build finds it in the listing, says so and publishes the store again."""
    source, reference = local
    store = build_shard_store(source, f"s3://stores/{how}", **_kw(tmp_path))
    name, message = _spoil(s3_env, store, how)
    row = next(r for r in range(len(store)) if _chunk_of(store, r) == name)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=f"reading row {row} .* failed: {message}"):
        store.images[row]
    assert time.monotonic() - start < 30
    with caplog.at_level(logging.WARNING):
        again = build_shard_store(source, f"s3://stores/{how}", **_kw(tmp_path / "fresh"))
    assert message in caplog.text and "rebuilding" in caplog.text
    assert torch.equal(again.images[:], reference.images[:])
    assert main(["--check", str(again.path)]) == 0
    _spoil(s3_env, again, how)
    assert main(["--check", str(again.path)]) == 1


def _chunk_of(store: ShardStore, row: int) -> str:
    """The chunk litdata's index (the meta's sample order) puts `row` in."""
    import json

    index = json.loads(
        store.path.client()
        .get_object(Bucket=store.path.bucket, Key=store.path.key("index.json"))["Body"]
        .read()
    )
    sample, start = store.samples[row], 0
    for chunk in index["chunks"]:
        if sample < start + chunk["chunk_size"]:
            return chunk["filename"]
        start += chunk["chunk_size"]
    raise IndexError(row)


def test_a_memmap_store_in_a_bucket_is_refused_early(tmp_path):
    from shared.data.datamodule import StoreDataModule

    with pytest.raises(ValueError, match="only data.store_kind=shards supports"):
        StoreDataModule(SyntheticSource(**SYNTH), "s3://stores/x", image_size=S)


# --- both pipelines from the command line ------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["ssl", "matching"])
def test_both_pipelines_train_from_a_bucket_as_from_local_shards(pipeline, s3_env, tmp_path):
    """`data.store_root=s3://...` with the AWS variables set: the run builds, publishes and
    reads the store through the cache, and its metrics are those of local shards."""
    from tests.pipelines import cli, run, run_dir

    metrics = {}
    for where, root in (("local", None), ("s3", f"s3://stores/cli-{pipeline}")):
        out = tmp_path / where
        extra = [f"data.store_root={root}"] if root else []
        result = run(cli(pipeline, out, "data.store_kind=shards", "data.shard_format=png", *extra))
        assert result.returncode == 0, result.stderr[-3000:]
        metrics[where] = _metric_rows(run_dir(pipeline, out) / "csv" / "metrics.csv")
    assert metrics["s3"] == metrics["local"] and metrics["local"]
    assert "meta.json" in str(_objects(s3_env, f"cli-{pipeline}"))
    assert list((tmp_path / "s3" / "data" / "s3_cache").rglob("chunk-*.bin"))


def test_a_bucket_store_streams_its_train_rows_from_the_bucket(local, s3_env, tmp_path):
    """data.stream over a bucket store: the train rows' copy is published beside it in the
    bucket, and one streamed epoch (2 loader workers, through the cache) holds every train
    row once, with the local store's pixels."""
    from shared.data.datamodule import StoreDataModule
    from shared.data.streaming import build_train_store, streaming_train_loader

    source, reference = local
    store = build_shard_store(source, "s3://stores/streamed", **_kw(tmp_path))
    dm = StoreDataModule(
        source, "s3://stores/streamed", S, batch_size=4, val_fraction=0.3, test_fraction=0.0,
        store_kind="shards", shard_format="png",
    )  # fmt: skip
    dm.store = store
    train_rows = dm.make_splits()[0]
    train = build_train_store(store, train_rows, "2kB", workers=1, start_method="fork")
    assert str(train.path).startswith(f"{store.path}-train-")
    assert "meta.json" in _objects(s3_env, train.path.prefix)
    assert not any((tmp_path / "cache" / "builds").iterdir())  # the local copy removed
    loader = streaming_train_loader(train, 4, 2, seed=0, drop_last=False)
    loader.set_epoch(0)
    batches = list(loader)
    rows = [r for b in batches for r in b["index"].tolist()]
    assert sorted(rows) == sorted(train_rows.tolist())
    for batch in batches:
        assert torch.equal(batch["images"], reference.images[batch["index"]])
