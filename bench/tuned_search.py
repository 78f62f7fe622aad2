"""Benchmark: exact (flat) search against IVF and HNSW tuned to a target recall.

`tuned_search` builds the index, raises nprobe / efSearch until 1000 sampled queries reach
`--target` recall of the flat top-k, then searches every query; the time includes all of it
(build, flat search of the sample, tuning). Gallery and queries: `--n` unit vectors
around 1000 random centres (d = `--dim`), searched by themselves (the matching evaluation's
self-search; `--queries` for a separate query set), one thread.

    python bench/tuned_search.py
    python bench/tuned_search.py --n 20000 --queries 2000 --target 0.95

Prints one line per index: seconds, the setting chosen, the sample recall it reached and the
recall of all queries against the flat top-k.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from shared.retrieval.search import knn_search, l2_normalize, sample_recall, tuned_search

NOISE = 0.5  # noise norm / centre norm: separate clusters, hard order within one


def clustered(n: int, dim: int, seed: int, centres: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, dim)) / np.sqrt(dim)  # norm ~1, as the centres
    x = centres[rng.integers(0, len(centres), n)] + NOISE * noise
    return l2_normalize(x.astype(np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=0, help="0: the gallery searches itself")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    centres = np.random.default_rng(0).standard_normal((1000, args.dim)) / np.sqrt(args.dim)
    g = clustered(args.n, args.dim, 1, centres)
    q = clustered(args.queries, args.dim, 2, centres) if args.queries else g
    t0 = time.perf_counter()
    flat_sims, _ = knn_search(q, g, args.k, device="cpu")
    print(f"flat  {time.perf_counter() - t0:7.2f} s  exact")
    for index in ("ivf", "hnsw"):
        t0 = time.perf_counter()
        sims, idx, info = tuned_search(
            q, g, args.k, index=index, target_recall=args.target, device="cpu"
        )
        s = time.perf_counter() - t0
        recall = sample_recall(sims, idx, flat_sims)
        print(f"{index:5} {s:7.2f} s  {info['param']}={info['value']}  sample recall "
              f"{info['recall']:.4f}  all queries {recall:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
