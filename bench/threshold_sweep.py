"""Benchmark: the vectorised Shopee threshold sweep against loops that give the same answer.

Synthetic Shopee-like data (20k postings in small label groups, 64-d embeddings, one exact
k = 51 self-search, shared by every method and not timed). Methods:

  vectorised          shared.retrieval.threshold.threshold_sweep: every threshold at once,
                      O(N k log T): numpy adds each candidate's score change to a
                      histogram over the thresholds, one cumulative sum reads them all
  per-threshold loop  one numpy pass over all rows per threshold, the shared work (sorting,
                      masks, true-match flags) hoisted out of the loop: O(N k T)
  naive python        per row and per threshold with Python sets, the metric's definition
                      written out (on a subset of rows, against the vectorised sweep of the
                      same rows)

The vectorised sweep and the loop run at `--thresholds` and at 10x as many. Repetitions are
interleaved (each rep runs every method back to back) and the best is reported; `x vec` is
a method's best time over the vectorised sweep's at the same rows and thresholds. F1,
precision and recall must agree to 1e-12 between all methods, or the script fails.

    python bench/threshold_sweep.py                    # 20k rows, 100 and 1000 thresholds
    python bench/threshold_sweep.py --rows 100000 --thresholds 50 --repeats 3

Prints a table and writes bench/results/threshold_sweep.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
from _report import write_results
from tqdm.auto import tqdm

from shared.retrieval.search import knn_search
from shared.retrieval.threshold import MAX_NEIGHBOURS, threshold_sweep

K = 51
RESULTS = Path(__file__).resolve().parent / "results" / "threshold_sweep.json"


def synthetic_postings(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels with Shopee-like group sizes (2..51, mostly 2-3 items)."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.geometric(0.45, rows) + 1, 2, 51)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), rows) + 1]
    labels = np.repeat(np.arange(len(sizes)), sizes)[:rows]
    centres = rng.standard_normal((len(sizes), 64)).astype(np.float32)
    # Per-group noise so some groups are tight and some loose: the F1 curve has a real peak.
    noise = rng.uniform(0.4, 1.4, len(sizes)).astype(np.float32)[labels, None]
    x = centres[labels] + noise * rng.standard_normal((rows, 64), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def per_threshold_loop(sims, idx, labels, thresholds, min2):
    """Same metric, one vectorised pass over rows per threshold."""
    n = len(labels)
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    valid = (idx >= 0) & (idx != np.arange(n)[:, None])
    s = np.where(valid, sims.astype(np.float64), -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")
    s, ix = np.take_along_axis(s, order, 1), np.take_along_axis(idx, order, 1)
    valid = np.take_along_axis(valid, order, 1)
    cand = valid & (np.cumsum(valid, axis=1) <= MAX_NEIGHBOURS)
    match = cand & (codes[np.clip(ix, 0, None)] == codes[:, None])
    truth = counts[codes]
    f1, precision, recall = [], [], []
    for t in thresholds:
        pred = cand & (s >= t)
        n_pred, n_tp = pred.sum(1), (pred & match).sum(1)
        if min2 is not None:
            add = (n_pred == 0) & cand[:, 0] & (s[:, 0] >= min2)
            n_pred, n_tp = n_pred + add, n_tp + (add & match[:, 0])
        inter, size = 1.0 + n_tp, 1.0 + n_pred
        f1.append(np.mean(2 * inter / (size + truth)))
        precision.append(np.mean(inter / size))
        recall.append(np.mean(inter / truth))
    return np.array(f1), np.array(precision), np.array(recall)


def naive_python(sims, idx, labels, thresholds, rows, min2):
    """Per row and per threshold with Python sets: the definition, written out."""
    groups: dict[int, set[int]] = {}
    for i, y in enumerate(labels.tolist()):
        groups.setdefault(y, set()).add(i)
    f1 = np.zeros(len(thresholds))
    for t_i, t in enumerate(thresholds.tolist()):
        total = 0.0
        for i in rows.tolist():
            others = [
                (s, j)
                for s, j in zip(sims[i].tolist(), idx[i].tolist(), strict=True)
                if j >= 0 and j != i
            ]
            others = sorted(others, key=lambda p: -p[0])[:MAX_NEIGHBOURS]
            pred = {i} | {j for s, j in others if s >= t}
            if min2 is not None and len(pred) == 1 and others and others[0][0] >= min2:
                pred.add(others[0][1])
            truth = groups[labels[i]]
            total += 2 * len(pred & truth) / (len(pred) + len(truth))
        f1[t_i] = total / len(rows)
    return f1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--thresholds", type=int, default=100, help="also run at 10x this")
    parser.add_argument("--naive-rows", type=int, default=300, help="subset for naive python")
    parser.add_argument("--min2", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method")
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads (the search)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)

    t_start = time.perf_counter()
    x, labels = synthetic_postings(args.rows, seed=0)
    start = time.perf_counter()
    sims, idx = knn_search(x, x, K, device="cpu")
    search_s = time.perf_counter() - start
    subset = np.random.default_rng(1).choice(args.rows, args.naive_rows, replace=False)
    grids = {n: np.linspace(0.3, 0.99, n) for n in (args.thresholds, 10 * args.thresholds)}

    def sweep(n_thr):
        res = threshold_sweep(sims, idx, labels, grids[n_thr], min2=args.min2)
        return res.f1, res.precision, res.recall

    # (method, rows, thresholds) -> callable returning (f1, precision, recall)
    methods = {}
    for n_thr in grids:
        methods["vectorised", args.rows, n_thr] = lambda n_thr=n_thr: sweep(n_thr)
        methods["per-threshold loop", args.rows, n_thr] = lambda n_thr=n_thr: per_threshold_loop(
            sims, idx, labels, grids[n_thr], args.min2
        )
    thr = grids[args.thresholds]
    methods["vectorised", args.naive_rows, args.thresholds] = lambda: (
        threshold_sweep(
            sims[subset], idx[subset], labels, thr, query_ids=subset, min2=args.min2
        ).f1,
    )
    times: dict[tuple, list[float]] = {key: [] for key in methods}
    answers: dict[tuple, tuple] = {}
    for rep in tqdm(range(args.repeats), desc="threshold sweep reps", unit="rep"):
        for key, fn in methods.items():
            t0 = time.perf_counter()
            answers[key] = fn()
            times[key].append(time.perf_counter() - t0)
        if rep == 0:  # one naive pass is enough: it takes seconds
            key = ("naive python", args.naive_rows, args.thresholds)
            t0 = time.perf_counter()
            answers[key] = (naive_python(sims, idx, labels, thr, subset, args.min2),)
            times[key] = [time.perf_counter() - t0]

    diffs = {}
    for n_thr in grids:
        vec, loop = (
            answers["vectorised", args.rows, n_thr],
            answers["per-threshold loop", args.rows, n_thr],
        )
        diffs[f"loop_vs_vectorised_{n_thr}"] = float(
            max(np.abs(a - b).max() for a, b in zip(vec, loop, strict=True))
        )
    sub_vec = answers["vectorised", args.naive_rows, args.thresholds][0]
    naive = answers["naive python", args.naive_rows, args.thresholds][0]
    diffs["naive_vs_vectorised_subset"] = float(np.abs(sub_vec - naive).max())
    if max(diffs.values()) > 1e-12:
        raise SystemExit(f"methods disagree: {diffs}")

    rows = []
    for (method, n_rows, n_thr), ts in times.items():
        base = min(times["vectorised", n_rows, n_thr])
        rows.append({
            "method": method, "rows": n_rows, "thresholds": n_thr, "reps": len(ts),
            "best_ms": round(min(ts) * 1e3, 2), "median_ms": round(statistics.median(ts) * 1e3, 2),
            "x_vectorised": round(min(ts) / base, 2),
        })  # fmt: skip
    rows.sort(key=lambda r: (-r["rows"], r["thresholds"], r["method"] != "vectorised"))
    best = threshold_sweep(sims, idx, labels, thr, min2=args.min2)
    elapsed = time.perf_counter() - t_start

    print(f"\nk={K}, min2={args.min2}, best of {args.repeats} interleaved runs (naive: 1 run)")
    print(f"kNN search (faiss flat, cpu, {args.rows} rows): {search_s:.2f} s, shared, not timed")
    print("x vec = this method's best time / the vectorised sweep's (same rows and thresholds)")
    print(
        f"{'method':<20}{'rows':>7}{'thresholds':>12}{'best ms':>10}{'median ms':>11}{'x vec':>8}"
    )
    for r in rows:
        print(f"{r['method']:<20}{r['rows']:>7}{r['thresholds']:>12}{r['best_ms']:>10.1f}"
              f"{r['median_ms']:>11.1f}{r['x_vectorised']:>7.2f}x")  # fmt: skip
    speedups = {}
    for n_thr in grids:
        loop = min(times["per-threshold loop", args.rows, n_thr])
        for name in [m for m, r, t in times if r == args.rows and t == n_thr and "vector" in m]:
            speedups[f"{name}, {n_thr} thresholds"] = round(
                loop / min(times[name, args.rows, n_thr]), 1
            )
    print("per-threshold loop / sweep: " + ", ".join(f"{v}x ({k})" for k, v in speedups.items()))
    print(f"best F1 {best.best_f1:.4f} at threshold {best.best_threshold:.3f}")
    print(f"max |difference| between methods: {max(diffs.values()):.1e}")
    print(f"total {elapsed:.0f} s")
    write_results(
        args, elapsed,
        {"k": K, "search_seconds": round(search_s, 3), "methods": rows, "max_abs_diff": diffs,
         "loop_over_sweep": speedups,
         "best_threshold": best.best_threshold, "best_f1": best.best_f1},
        numpy=np.__version__, faiss=faiss.__version__,
    )  # fmt: skip


if __name__ == "__main__":
    main()
