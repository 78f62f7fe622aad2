"""Benchmark: exact (flat) search against IVF and HNSW tuned to a target recall.

`tuned_search` builds the index, raises nprobe / efSearch until 1000 sampled queries reach
`--target` recall of the flat top-k, then searches every query; the time includes all of it
(build, flat search of the sample, tuning). Gallery and queries: `--n` unit vectors around
1000 random centres (d = `--dim`); `--queries` separate queries (the kNN evaluation: a bank
and a query split), or 0: the gallery searches itself (the matching evaluation).

Each index runs in a fresh process, so its peak memory (peak RSS above the resident inputs,
made before the clock starts) is its own. Recall over all queries is against a flat search made
after the peak is read; a self-search of a large gallery (over `--flat-limit` queries) has
no flat reference for all rows, so there the flat time is the sampled flat search's, scaled
by the number of queries, and the recall is the 1000-query sample's.

    python bench/tuned_search.py --n 1000000 --queries 1000      # kNN evaluation at 1M
    python bench/tuned_search.py --n 1000000 --index ivf         # matching self-search at 1M
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import faiss
import numpy as np

from shared.retrieval.search import knn_search, l2_normalize, sample_recall, tuned_search

NOISE = 0.5  # noise norm / centre norm: separate clusters, hard order within one
SAMPLE = 1000  # tuned_search's default sample of queries


def clustered(n: int, dim: int, seed: int, centres: np.ndarray) -> np.ndarray:
    """Made in blocks, so making them peaks at little more than the result (the benchmark
    reads each index's memory as the peak above this)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):
        m = min(65536, n - start)
        noise = rng.standard_normal((m, dim)) / np.sqrt(dim)  # norm ~1, as the centres
        block = centres[rng.integers(0, len(centres), m)] + NOISE * noise
        out[start : start + m] = l2_normalize(block)
    return out


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def reset_peak() -> float:
    """Start the peak-RSS mark (Linux's VmHWM) again from now; the resident MB now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    return _status_mb("VmHWM")


def one(args) -> dict:
    """Time, extra peak memory and recall of one index on the benchmark's data."""
    faiss.omp_set_num_threads(args.threads)
    centres = np.random.default_rng(0).standard_normal((1000, args.dim)) / np.sqrt(args.dim)
    g = clustered(args.n, args.dim, 1, centres)
    q = clustered(args.queries, args.dim, 2, centres) if args.queries else g
    base = reset_peak()  # the inputs, held; the peak above them is the search's
    t0 = time.perf_counter()
    if args.only == "flat" and len(q) > args.flat_limit:
        rows = np.random.default_rng(0).choice(len(q), SAMPLE, replace=False)
        knn_search(q[np.sort(rows)], g, args.k, device="cpu")
        seconds = (time.perf_counter() - t0) * len(q) / SAMPLE
        return {"index": "flat", "s": seconds, "mb": peak_mb() - base, "note": "scaled"}
    if args.only == "flat":
        knn_search(q, g, args.k, device="cpu")
        return {"index": "flat", "s": time.perf_counter() - t0, "mb": peak_mb() - base}
    sims, idx, info = tuned_search(
        q, g, args.k, index=args.only, target_recall=args.target, device="cpu"
    )
    out = {"index": args.only, "s": time.perf_counter() - t0, "mb": peak_mb() - base}
    out |= {"setting": f"{info['param']}={info['value']}", "sample_recall": info["recall"]}
    if len(q) <= args.flat_limit:  # after the peak is read: flat's memory is not counted
        exact, _ = knn_search(q, g, args.k, device="cpu")
        out["recall"] = sample_recall(sims, idx, exact)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=0, help="0: the gallery searches itself")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--index", nargs="+", default=["flat", "ivf", "hnsw"])
    ap.add_argument("--flat-limit", type=int, default=100_000,
                    help="largest query count searched flat in full")  # fmt: skip
    ap.add_argument("--only", help=argparse.SUPPRESS)  # one index, in this process
    args = ap.parse_args()
    if args.only:
        print(json.dumps(one(args)))
        return
    queries = args.queries or args.n
    print(f"N = {args.n:,} x {args.dim}-d, {queries:,} queries, k = {args.k}, "
          f"target recall {args.target}, {args.threads} thread(s)")  # fmt: skip
    for index in args.index:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", index]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(result.stdout.strip().splitlines()[-1])
        recall = r.get("recall", r.get("sample_recall"))
        what = "exact" if index == "flat" else f"{r['setting']}, recall {recall:.4f}"
        if index != "flat" and "recall" not in r:
            what += f" (the {SAMPLE}-query sample)"
        scaled = " (sampled flat x queries / 1000)" if r.get("note") == "scaled" else ""
        print(f"{index:5} {r['s']:8.1f} s{scaled}  +{r['mb']:7.0f} MB  {what}")


if __name__ == "__main__":
    main()
