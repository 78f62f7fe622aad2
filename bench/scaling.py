"""Benchmark: time and peak memory of the kNN evaluation and the F1 sweep as the gallery grows.

Two evaluation paths, each with an exact (flat) and an approximate (IVF) FAISS index:

  knn    what `KNNCallback` runs: `gather_by_index` of a bank arriving in shuffled order
         (as DDP ranks deliver it) and of the queries, then `knn_accuracy` (top-1 for
         k = 10/20/100/200, T = 0.07) of `--queries` queries against an N-item bank.
         Features: `make_features` of bench/knn_eval.py, d = 384 (ViT-S/16), 100 classes.
  sweep  what `MatchingEvalCallback` runs: `knn_search` of the N postings against
         themselves (k = 51), then `threshold_sweep` over its 101 thresholds (0, 0.01 .. 1).
         Postings: `synthetic_postings` of bench/threshold_sweep.py (Shopee-like groups,
         d = 64), so the search does not hide the sweep.

flat is `IndexFlatIP` (exact), run where it is sensible: every size for knn (one pass of the
queries over the bank), up to `--sweep-flat-max` for the sweep (a self-search is N^2 work:
100k x 100k is ~30 s on one core, 1M x 1M would be ~50 min). IVF is `IndexIVFFlat` with
nlist = 4 sqrt(N) cells (`--nlist-factor`; FAISS's guideline, and the cost optimum of a
self-search at nprobe 16), `--nprobe` 16 cells visited per query, trained on
`--train-per-cell` 40 rows per cell drawn at random (FAISS asks for >= 39). IVF runs for the
sweep at every size, for knn up to `--knn-ivf-max` (100k): with 1k queries the IVF build
(k-means, then assigning every bank row to a cell) costs far more than the flat search it
replaces (at 1M: 120 s against 15 s, measured with `--knn-ivf-max 1000000`). Where both
ran, the table gives IVF against flat: the kNN top-1 difference (worst k) and, for the sweep,
the best-F1 difference and the recall of the 51-neighbour lists (first 2000 rows).

Every (path, index, N) runs in a fresh process forked from a server that has only imported
the libraries, so sizes do not share memory. There the inputs are generated (in chunks), the
peak-RSS mark is reset (Linux /proc/self/clear_refs; elsewhere the peak includes the data)
and the path is timed: `s` = best of `--reps`, `data MB` = the inputs' resident size, `peak
MB` = the peak during the path (inputs included), `extra MB` = peak - data.

Default (10k, 100k, 1M; 1k queries; 1 thread): about 4.5 min at load average 2 on the 2-core
machine, most of it the 1M IVF self-search of the sweep (~165 s); peak RSS ~3.5 GB (the 1M
kNN bank, 1.5 GB, and its by-index copy). `--quick` (10k, 30k, 500 queries): ~20 s quiet.

    python bench/scaling.py
    python bench/scaling.py --quick
    python bench/scaling.py --sizes 10000 100000 --nprobe 8 32 --threads 2

Prints a table, writes bench/results/scaling.json and the plot bench/results/scaling.png
(log-log: time and extra memory against N, one line per path and index, plus the time of
`threshold_sweep` alone).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # knn_eval, threshold_sweep, _report

RESULTS = Path(__file__).resolve().parent / "results" / "scaling.json"
KS = (10, 20, 100, 200)
TEMPERATURE = 0.07
SWEEP_K = 51  # groups of at most 50 plus the posting itself
SWEEP_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # conf/callbacks/matching_eval.yaml
RECALL_ROWS = 2000
PRELOAD = ["numpy", "torch", "faiss", "shared.distributed", "shared.retrieval.knn",
           "shared.retrieval.threshold"]  # fmt: skip


def rss_mb() -> float:
    """Resident set size now, MB."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Set the peak-RSS mark to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """Peak resident set size since the process started or `reset_peak`, MB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def search_options(index: str, n: int, nlist_factor: float, nprobe: int, per_cell: int):
    """knn_search keyword arguments for `index` on an N-item gallery."""
    if index == "flat":
        return {"index": "flat"}
    nlist = max(1, min(n, round(nlist_factor * math.sqrt(n))))
    return {"index": "ivf", "nlist": nlist, "nprobe": min(nprobe, nlist),
            "train_size": min(n, per_cell * nlist)}  # fmt: skip


def run_case(case: dict) -> dict:
    """Build the inputs of one (path, index, N) case, then time the path and take its peak
    memory. In a fresh process for the benchmark; in-process (toy sizes) for the tests."""
    import faiss
    import torch

    from shared.distributed import gather_by_index
    from shared.retrieval.knn import knn_accuracy
    from shared.retrieval.search import knn_search
    from shared.retrieval.threshold import threshold_sweep

    torch.set_num_threads(case["threads"])
    faiss.omp_set_num_threads(case["threads"])
    n, seed = case["n"], case["seed"]
    opts = search_options(case["index"], n, case["nlist_factor"], case["nprobe"],
                          case["train_per_cell"])  # fmt: skip
    rss_start = rss_mb()
    if case["part"] == "knn":
        from knn_eval import make_features

        bank, bank_y, query, query_y = make_features(n, case["queries"], case["dim"], 100, 4.0,
                                                     seed)  # fmt: skip
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
        bank, bank_y = bank[perm], bank_y[perm]  # the order DDP ranks would deliver rows in
        query_index = torch.arange(case["queries"])

        def path():
            _, b, by = gather_by_index(perm, bank, bank_y)
            _, q, qy = gather_by_index(query_index, query, query_y)
            acc = knn_accuracy(b, by, q, qy, ks=KS, temperature=TEMPERATURE, num_classes=100,
                               **opts)  # fmt: skip
            return {"accuracy": {str(k): v for k, v in acc.items()}}, {}
    elif case["part"] == "sweep":
        from threshold_sweep import synthetic_postings

        x, labels = synthetic_postings(n, seed)

        def path():
            t0 = time.perf_counter()
            sims, idx = knn_search(x, x, SWEEP_K, **opts)
            t1 = time.perf_counter()
            res = threshold_sweep(sims, idx, labels, SWEEP_THRESHOLDS)
            t2 = time.perf_counter()
            out = {"best_f1": res.best_f1, "best_threshold": res.best_threshold,
                   "f1": res.f1.tolist(), "neighbours": idx[:RECALL_ROWS]}  # fmt: skip
            return out, {"search_s": t1 - t0, "sweep_s": t2 - t1}
    else:
        raise ValueError(f"unknown part {case['part']!r}")

    data_mb = rss_mb() - rss_start
    rss_before = rss_mb()
    exact_peak = reset_peak()
    times, parts, result = [], [], {}
    for _ in range(case["reps"]):
        t0 = time.perf_counter()
        result, split = path()
        times.append(time.perf_counter() - t0)
        parts.append(split)
    peak = peak_mb()
    best = int(np.argmin(times))
    return {
        **{k: case[k] for k in ("part", "index", "n")},
        "queries": case["queries"] if case["part"] == "knn" else n,
        "dim": case["dim"] if case["part"] == "knn" else 64,
        "options": opts, "threads": case["threads"], "reps": case["reps"],
        "seconds": times[best], **{k: v for k, v in parts[best].items()},
        "data_mb": data_mb, "peak_mb": peak, "extra_mb": max(0.0, peak - rss_before),
        "peak_reset": exact_peak, **result,
    }  # fmt: skip


def compare(rows: list[dict]) -> None:
    """Add IVF-vs-flat figures to each IVF row whose flat twin ran."""
    flat = {(r["part"], r["n"]): r for r in rows if r["index"] == "flat"}
    for r in rows:
        ref = flat.get((r["part"], r["n"]))
        if r["index"] != "ivf" or ref is None:
            continue
        if r["part"] == "knn":
            r["vs_flat"] = {"max_abs_top1_diff": max(
                abs(r["accuracy"][k] - ref["accuracy"][k]) for k in r["accuracy"])}  # fmt: skip
        else:
            found = [len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, (b >= 0).sum())
                     for a, b in zip(r["neighbours"], ref["neighbours"], strict=True)]  # fmt: skip
            r["vs_flat"] = {
                "best_f1_diff": r["best_f1"] - ref["best_f1"],
                "max_abs_f1_diff": float(np.max(np.abs(np.subtract(r["f1"], ref["f1"])))),
                "neighbour_recall": float(np.mean(found)),
            }


def plot(rows: list[dict], path: Path) -> Path:
    """Two log-log panels, time and extra memory against N, one line per path and index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for part, index in sorted({(r["part"], r["index"]) for r in rows}):
        sel = sorted((r for r in rows if (r["part"], r["index"]) == (part, index)),
                     key=lambda r: r["n"])  # fmt: skip
        style = {"marker": "o", "linestyle": "-" if index == "flat" else "--"}
        label = f"{part} {index}"
        axes[0].plot([r["n"] for r in sel], [r["seconds"] for r in sel], label=label, **style)
        axes[1].plot([r["n"] for r in sel], [max(r["extra_mb"], 1.0) for r in sel], label=label,
                     **style)  # fmt: skip
        if part == "sweep" and index == "ivf":  # the sweep alone, on the IVF lists
            axes[0].plot([r["n"] for r in sel], [r["sweep_s"] for r in sel], marker="o",
                         linestyle=":", label="threshold_sweep alone")  # fmt: skip
    for ax, ylabel in zip(axes, ("seconds (best)", "peak memory above the inputs, MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gallery size N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def build_cases(args) -> list[dict]:
    common = {"queries": args.queries, "dim": args.dim, "threads": args.threads,
              "reps": args.reps, "seed": args.seed, "nlist_factor": args.nlist_factor,
              "train_per_cell": args.train_per_cell}  # fmt: skip
    cases = []
    for n in args.sizes:
        for nprobe in args.nprobe:
            if n <= args.knn_ivf_max:
                cases.append({"part": "knn", "index": "ivf", "n": n, "nprobe": nprobe, **common})
            cases.append({"part": "sweep", "index": "ivf", "n": n, "nprobe": nprobe, **common})
        if n <= args.knn_flat_max:
            cases.append({"part": "knn", "index": "flat", "n": n, "nprobe": 0, **common})
        if n <= args.sweep_flat_max:
            cases.append({"part": "sweep", "index": "flat", "n": n, "nprobe": 0, **common})
    return sorted(cases, key=lambda c: (c["n"], c["part"], c["index"] != "flat", c["nprobe"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=1000, help="kNN queries (every size)")
    ap.add_argument("--dim", type=int, default=384, help="kNN feature dim (384 = ViT-S/16)")
    ap.add_argument("--nlist-factor", type=float, default=4.0, help="IVF nlist = f sqrt(N)")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[16], help="IVF cells probed")
    ap.add_argument("--train-per-cell", type=int, default=40, help="IVF k-means sample")
    ap.add_argument("--knn-flat-max", type=int, default=10**9, help="largest flat kNN bank")
    ap.add_argument("--knn-ivf-max", type=int, default=100_000, help="largest IVF kNN bank")
    ap.add_argument("--sweep-flat-max", type=int, default=100_000, help="largest flat sweep")
    ap.add_argument("--threads", type=int, default=1, help="torch and FAISS threads")
    ap.add_argument("--reps", type=int, default=1, help="timed runs per case (best-of)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="sizes 10k 30k, 500 queries")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.queries = [10_000, 30_000], 500
    if min(args.sizes) <= max(KS) or min(args.sizes) < SWEEP_K:
        ap.error(f"every size must exceed {max(KS)}")

    from _report import write_results
    from tqdm.auto import tqdm

    cases = build_cases(args)
    t_start = time.perf_counter()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    env_threads = str(args.threads)
    os.environ.update(OMP_NUM_THREADS=env_threads, MKL_NUM_THREADS=env_threads)
    rows = []
    with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:
        for case in tqdm(cases, desc="scaling cases", unit="case"):
            rows.append(pool.submit(run_case, case).result())
    compare(rows)
    elapsed = time.perf_counter() - t_start

    print(
        f"\n{'path':<6}{'index':<6}{'N':>9}{'queries':>9}{'nlist':>6}{'nprobe':>7}{'s':>9}"
        f"{'search s':>9}{'sweep s':>8}{'data MB':>9}{'peak MB':>9}{'extra MB':>9}  result"
    )
    for r in rows:
        opts = r["options"]
        if r["part"] == "knn":
            res = (
                "top1@"
                + "/".join(r["accuracy"])
                + " "
                + "/".join(f"{v:.3f}" for v in r["accuracy"].values())
            )
        else:
            res = f"F1 {r['best_f1']:.4f} @ {r['best_threshold']:.2f}"
        vs = r.get("vs_flat")
        if vs and r["part"] == "knn":
            res += f"  vs flat: max |dtop1| {vs['max_abs_top1_diff']:.4f}"
        elif vs:
            res += (f"  vs flat: dF1 {vs['best_f1_diff']:+.4f}, neighbour recall "
                    f"{vs['neighbour_recall']:.3f}")  # fmt: skip
        search = f"{r['search_s']:9.2f}" if "search_s" in r else f"{'':>9}"
        sweep = f"{r['sweep_s']:8.2f}" if "sweep_s" in r else f"{'':>8}"
        print(f"{r['part']:<6}{r['index']:<6}{r['n']:>9}{r['queries']:>9}"
              f"{opts.get('nlist', ''):>6}{opts.get('nprobe', ''):>7}{r['seconds']:>9.2f}"
              f"{search}{sweep}{r['data_mb']:>9.0f}{r['peak_mb']:>9.0f}{r['extra_mb']:>9.0f}  "
              f"{res}")  # fmt: skip
    if not all(r["peak_reset"] for r in rows):
        print("(no /proc/self/clear_refs here: peak MB includes building the inputs)")
    print(f"total {elapsed:.0f} s")
    for r in rows:
        r.pop("neighbours", None)
        r["f1"] = [round(v, 6) for v in r.get("f1", [])] or None
    write_results(args, elapsed, {"rows": rows})
    print(f"wrote {plot(rows, args.out.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
