"""Benchmark: vectorised Shopee threshold sweep against loops that give the same answer.

Synthetic Shopee-like data (~20k postings in small label groups, 64-d embeddings, one exact
k = 51 self-search), 100 thresholds. Methods:
  vectorised         shared.retrieval.threshold.threshold_sweep (all thresholds at once)
  per-threshold loop one numpy pass over all rows per threshold (the obvious baseline)
  naive python       per row, per threshold, with Python sets (on a subset of rows)
The vectorised and loop methods also run with 10x the thresholds, to show how each scales.
All answers are checked equal; a table is printed and JSON written to
bench/results/threshold_sweep.json.

    python bench/threshold_sweep.py [--rows 20000] [--naive-rows 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from shared.retrieval.search import knn_search
from shared.retrieval.threshold import MAX_NEIGHBOURS, threshold_sweep

K = 51


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


def best_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--naive-rows", type=int, default=300, help="subset for naive python")
    parser.add_argument("--thresholds", type=int, default=100)
    parser.add_argument("--min2", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/threshold_sweep.json")
    args = parser.parse_args()

    x, labels = synthetic_postings(args.rows, seed=0)
    start = time.perf_counter()
    sims, idx = knn_search(x, x, K, device="cpu")
    search_s = time.perf_counter() - start
    thresholds = np.linspace(0.3, 0.99, args.thresholds)
    subset = np.random.default_rng(1).choice(args.rows, args.naive_rows, replace=False)

    def vectorised(thr, rows=None):
        if rows is None:
            return threshold_sweep(sims, idx, labels, thr, min2=args.min2)
        return threshold_sweep(sims[rows], idx[rows], labels, thr, query_ids=rows, min2=args.min2)

    table, diffs = [], {}
    vec = None
    for n_thr in (args.thresholds, 10 * args.thresholds):
        thr = np.linspace(0.3, 0.99, n_thr)
        vec_s, res = best_time(lambda thr=thr: vectorised(thr), args.repeats)
        loop_s, (f1, p, r) = best_time(
            lambda thr=thr: per_threshold_loop(sims, idx, labels, thr, args.min2), args.repeats
        )
        diffs[f"loop_vs_vectorised_{n_thr}"] = float(
            max(
                np.abs(res.f1 - f1).max(),
                np.abs(res.precision - p).max(),
                np.abs(res.recall - r).max(),
            )
        )
        table.append(("vectorised", args.rows, n_thr, vec_s, 1.0))
        table.append(("per-threshold loop", args.rows, n_thr, loop_s, loop_s / vec_s))
        vec = res if vec is None else vec
    sub_s, sub = best_time(lambda: vectorised(thresholds, subset), args.repeats)
    naive_s, naive_f1 = best_time(
        lambda: naive_python(sims, idx, labels, thresholds, subset, args.min2), 1
    )
    diffs["naive_vs_vectorised_subset"] = float(np.abs(sub.f1 - naive_f1).max())
    table.append(("vectorised", args.naive_rows, args.thresholds, sub_s, 1.0))
    table.append(("naive python", args.naive_rows, args.thresholds, naive_s, naive_s / sub_s))
    if max(diffs.values()) > 1e-12:
        raise SystemExit(f"methods disagree: {diffs}")

    print(f"k={K}, min2={args.min2}, best of {args.repeats} runs")
    print(f"kNN search (faiss flat, cpu, {args.rows} rows): {search_s:.2f} s, shared by all")
    print("speed-up = this method's seconds / the vectorised sweep's on the same rows+thresholds")
    print(f"{'method':<20}{'rows':>7}{'thresholds':>12}{'seconds':>10}{'speed-up':>10}")
    for name, rows, n_thr, secs, ratio in table:
        print(f"{name:<20}{rows:>7}{n_thr:>12}{secs:>10.4f}{ratio:>9.1f}x")
    print(f"best F1 {vec.best_f1:.4f} at threshold {vec.best_threshold:.3f}")
    print(f"max |difference| between methods: {max(diffs.values()):.1e}")

    result = {
        "rows": args.rows,
        "k": K,
        "min2": args.min2,
        "repeats": args.repeats,
        "search_seconds": search_s,
        "methods": [
            dict(zip(("method", "rows", "thresholds", "seconds", "speedup"), row, strict=True))
            for row in table
        ],
        "max_abs_diff": diffs,
        "best_threshold": vec.best_threshold,
        "best_f1": vec.best_f1,
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
