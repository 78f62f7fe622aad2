"""Benchmark: what one POST /gallery addition costs the gallery, by gallery size.

For each size N, a gallery of N random unit vectors (dim `--dim`) is stored in SQLite as the
service stores it (`GalleryStore`, WAL, synchronous=FULL), then `--adds` single postings are
added one at a time: the median time of `Gallery.add` (commit included). Beside it, what the
previous design paid per addition: rewriting the whole FAISS index (serialise + write + rename,
as `index_path` did) under the search lock. Also the start-up cost: reading the store back
into the index. Each addition is checked: the posting is found by its own vector afterwards.

    python bench/gallery_add.py                       # 10k and 100k postings, dim 512
    python bench/gallery_add.py --sizes 10000 100000 300000 --adds 50

Prints a table (ms) and the 100k/10k ratios; writes bench/results/gallery_add.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from _report import write_results

from matching.service.gallery import Gallery, GalleryStore, Posting

RESULTS = Path(__file__).resolve().parent / "results" / "gallery_add.json"


def unit(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def postings(start: int, n: int) -> list[Posting]:
    return [Posting(f"p{i}", f"g{i % 97}", None, f"/img/{i}.png") for i in range(start, start + n)]


def rewrite_index(index, folder: Path) -> None:
    """The previous per-addition save: the whole index to a temp file, renamed into place."""
    tmp = folder / ".index.tmp"
    with open(tmp, "wb") as fh:
        np.savez(fh, index=faiss.serialize_index(index))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / "index.npz")


def one_size(n: int, args, rng, folder: Path) -> dict:
    x = unit(rng, n, args.dim)
    store = GalleryStore(folder / "gallery.sqlite")
    store.reseed(x, postings(0, n), {"dim": str(args.dim)})
    store.close()
    os.sync()  # the seed's writeback must not slow the timed commits' fsyncs
    t0 = time.perf_counter()
    gallery = Gallery.from_store(GalleryStore(folder / "gallery.sqlite"), args.dim, "bench")
    load_s = time.perf_counter() - t0
    adds, rewrites = [], []
    new = unit(rng, args.adds + 1, args.dim)
    gallery.add(new[-1:], postings(n + args.adds, 1))  # untimed: FAISS grows its buffer once
    for i in range(args.adds):
        t0 = time.perf_counter()
        gallery.add(new[i : i + 1], postings(n + i, 1))
        adds.append(time.perf_counter() - t0)
        hit = gallery.search(new[i : i + 1], 1)[0][0]
        assert hit.posting.posting_id == f"p{n + i}", hit
    for _ in range(args.rewrites):
        t0 = time.perf_counter()
        rewrite_index(gallery._index, folder)
        rewrites.append(time.perf_counter() - t0)
    gallery.close()
    return {
        "postings": n,
        "add_ms": round(1e3 * statistics.median(adds), 2),
        "add_p95_ms": round(1e3 * float(np.percentile(adds, 95)), 2),
        "rewrite_ms": round(1e3 * statistics.median(rewrites), 1),
        "load_s": round(load_s, 2),
        "db_mb": round((folder / "gallery.sqlite").stat().st_size / 2**20, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--adds", type=int, default=30, help="single-posting additions per size")
    p.add_argument("--rewrites", type=int, default=3, help="whole-index rewrites per size")
    p.add_argument("--dir", type=Path, default=None, help="where the stores go (default: tmp)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    rows = []
    print(
        f"{'postings':>9} {'add ms':>8} {'add p95':>8} {'rewrite ms':>11} {'load s':>7} {'MB':>7}"
    )
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="gallery_add_", dir=args.dir) as tmp:
            r = one_size(n, args, rng, Path(tmp))
        rows.append(r)
        print(
            f"{r['postings']:>9} {r['add_ms']:>8} {r['add_p95_ms']:>8} {r['rewrite_ms']:>11} "
            f"{r['load_s']:>7} {r['db_mb']:>7}"
        )
    first, last = rows[0], rows[-1]
    ratios = {
        "add": round(last["add_ms"] / first["add_ms"], 2),
        "rewrite": round(last["rewrite_ms"] / first["rewrite_ms"], 2),
    }
    print(
        f"{last['postings']} vs {first['postings']} postings: one addition x{ratios['add']} "
        f"(the old whole-index rewrite: x{ratios['rewrite']})"
    )
    write_results(args, time.perf_counter() - start, {"sizes": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
