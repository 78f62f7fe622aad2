"""Concurrent builds of one store or data set: built once, never seen half-written."""

from __future__ import annotations

import fcntl
import json
import logging
import subprocess
import sys
import threading
import time

import pytest
import torch

from shared.data import publish as publish_mod
from shared.data import store as store_mod
from shared.data.publish import build_lock, lock_path, publish
from shared.data.sources import SyntheticSource
from shared.data.store import build_store
from shared.data.synthetic.writers import _write_atomically
from tests.conftest import REPO

TINY = dict(num_families=3, groups_per_family=2, min_instances=2, max_instances=3, image_size=32)

# One job of a sweep: waits for the start signal, then builds (slowly) and reads the store.
JOB = f"""
import logging, os, sys, time
from pathlib import Path
from shared.data.sources import SyntheticSource
from shared.data.store import build_store

root, go, decodes = map(Path, sys.argv[1:4])
logging.basicConfig(level=logging.INFO)

class SlowSource(SyntheticSource):
    def load(self, indices, size):
        with open(decodes, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        time.sleep(0.3)
        return super().load(indices, size)

source = SlowSource(**{TINY!r})
(go.parent / f"ready-{{os.getpid()}}").touch()
while not go.exists():
    time.sleep(0.005)
store = build_store(source, root, 16, progress=False)
print(store.path.name, int(store.images[:].sum()), len(store))
"""


def test_jobs_starting_together_build_the_store_once(tmp_path):
    root, go, decodes = tmp_path / "stores", tmp_path / "go", tmp_path / "decodes.txt"
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", JOB, str(root), str(go), str(decodes)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    deadline = time.time() + 120  # start them together, once all three have imported
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = [job.communicate(timeout=300) for job in jobs]
    for job, (_, err) in zip(jobs, outputs):
        assert job.returncode == 0, err[-2000:]
    results = {out.strip() for out, _ in outputs}
    assert len(results) == 1  # same store, same bytes
    builders = set(decodes.read_text().split())
    assert len(builders) == 1, f"{len(builders)} jobs decoded the images; one should have"
    assert sum("Waiting for another process" in err for _, err in outputs) >= 1
    name = results.pop().split()[0]
    assert [p.name for p in root.iterdir()] == [name]  # no lock, temp or old dir left
    direct = build_store(SyntheticSource(**TINY), tmp_path / "direct", 16, progress=False)
    assert direct.path.name == name


def test_without_locks_a_concurrent_writer_wins_and_no_reader_breaks(tmp_path, monkeypatch):
    """Locks unavailable: another process publishes the same store while we build ours."""
    monkeypatch.setattr(publish_mod, "fcntl", None)
    root = tmp_path / "stores"
    write = store_mod._write_store
    theirs = {}

    def write_while_another_finishes(source, tmp, *args):
        meta = write(source, tmp, *args)
        if not theirs:  # the other process: builds and publishes the same store first
            theirs["store"] = None
            theirs["store"] = build_store(SyntheticSource(**TINY), root, 16, progress=False)
        return meta

    monkeypatch.setattr(store_mod, "_write_store", write_while_another_finishes)
    ours = build_store(SyntheticSource(**TINY), root, 16, progress=False)
    assert ours.path == theirs["store"].path
    assert torch.equal(ours.images[:], theirs["store"].images[:])
    assert torch.equal(ours.labels, theirs["store"].labels)
    assert [p.name for p in root.iterdir()] == [ours.path.name]  # our copy was dropped


def test_a_stale_store_is_swapped_by_renames_and_its_old_copy_removed(tmp_path, caplog):
    pinned = tmp_path / "pinned"
    small = build_store(SyntheticSource(**TINY), tmp_path, 16, path=pinned, progress=False)
    with caplog.at_level(logging.WARNING):
        big = build_store(SyntheticSource(**TINY), tmp_path, 24, path=pinned, progress=False)
    assert "was built from another source or size" in caplog.text
    assert small.path == big.path and big.images.shape[-1] == 24
    assert json.loads((pinned / "meta.json").read_text())["image_size"] == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pinned"]


def test_a_killed_builds_temp_dir_is_removed_by_the_next_build(tmp_path):
    root = tmp_path / "stores"
    name = build_store(SyntheticSource(**TINY), tmp_path / "probe", 16, progress=False).path.name
    leftover = root / f".{name}.tmp-4242-deadbeef"
    (leftover / "tensors").mkdir(parents=True)
    (leftover / "tensors" / "images.memmap").write_bytes(b"\0" * 100)
    other = root / f".{name}x.tmp-1-keep"  # another target's temp dir is not ours to remove
    other.mkdir()
    build_store(SyntheticSource(**TINY), root, 16, progress=False)
    assert sorted(p.name for p in root.iterdir()) == [other.name, name]


def test_publish_drops_our_copy_when_a_complete_one_is_in_place(tmp_path):
    target, tmp = tmp_path / "out", tmp_path / ".out.tmp-1"
    target.mkdir()
    (target / "mark").write_text("theirs")
    tmp.mkdir()
    (tmp / "mark").write_text("ours")
    assert not publish(tmp, target, lambda at: (at / "mark").is_file())
    assert (target / "mark").read_text() == "theirs" and not tmp.exists()
    tmp.mkdir()
    (tmp / "mark").write_text("ours")
    assert publish(tmp, target, lambda at: False)  # not complete: replaced
    assert (target / "mark").read_text() == "ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_lock_on_a_file_its_holder_unlinked_is_taken_again(tmp_path):
    """The holder removes the lock file on release. A waiter that wakes on the removed file
    must lock the current one instead, or it would run beside the current file's holder."""
    target = tmp_path / "store"
    path = lock_path(target)
    first = open(path, "a+b")
    fcntl.flock(first, fcntl.LOCK_EX)
    entered, leave = threading.Event(), threading.Event()

    def waiter():
        with build_lock(target) as locked:
            assert locked
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)  # the waiter now blocks on the first file
    assert not entered.is_set()
    path.unlink()  # the first holder releases the way build_lock does...
    newcomer = open(path, "a+b")  # ...and a newcomer locks the new file meanwhile
    fcntl.flock(newcomer, fcntl.LOCK_EX)
    fcntl.flock(first, fcntl.LOCK_UN)
    first.close()
    assert not entered.wait(0.5), "the waiter took a lock on an unlinked file"
    fcntl.flock(newcomer, fcntl.LOCK_UN)  # the newcomer is done (and keeps its file)
    assert entered.wait(5)
    leave.set()
    thread.join(5)
    newcomer.close()
    assert not path.exists()  # the waiter removed the lock file on release


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_writing_one_data_set_fill_it_once(tmp_path, threads):
    out, calls, results = tmp_path / "shop", [], []
    marker = {"kind": "test", "rows": 1}

    def fill(tmp):
        calls.append(tmp)
        time.sleep(0.2)
        (tmp / "data.txt").write_text("rows")

    def write():
        results.append(_write_atomically(out, marker, fill, overwrite=False))

    pool = [threading.Thread(target=write) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(10)
    assert len(calls) == 1 and sorted(results) == [False] * (threads - 1) + [True]
    assert (out / "data.txt").read_text() == "rows"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop"]
