"""Benchmark: the weighted kNN evaluation path against raw FAISS and brute-force torch.

All three score the same random L2-normalised features (class centres plus noise, so the
accuracy is neither 0 nor 1) with the DINO protocol: weight exp(sim / 0.07) over the k
nearest bank items, top-1 for every k in `--ks` from one search with the largest k.

  ours    what `KNNCallback` runs at the end of a validation epoch: `gather_by_index` of
          bank and queries (one process, rows arriving in a shuffled order, so the sort by
          index does real work) then `shared.retrieval.knn.knn_accuracy` (device "auto").
  faiss   `faiss.IndexFlatIP` add + search(k = max k), then a torch scatter-add vote inline.
  torch   queries @ bank.T in chunks, `topk(max k)`, the same vote.

Every timed call starts from the same torch tensors. Repetitions are interleaved (each rep
runs the three methods back to back) and the best is reported: `ms` best, `ms med` median,
`x ours` = ours' best time over the method's best (> 1: the method is faster than ours).
The accuracies must agree for every k (up to float ties at the k-th neighbour, reported as
`max |dacc|`); the script fails loudly if they differ by more than one query in a thousand.

    python bench/knn_eval.py                               # banks 10k 50k, 2k queries, d 384
    python bench/knn_eval.py --queries 10000 --dims 384 2048 --threads 1 2

Prints a table and writes bench/results/knn_eval.json.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import faiss
import torch
from _report import write_results
from tqdm.auto import tqdm

from shared.distributed import gather_by_index
from shared.retrieval.knn import knn_accuracy

RESULTS = Path(__file__).resolve().parent / "results" / "knn_eval.json"
TEMPERATURE = 0.07  # Wu et al. 2018, as DINO


def make_features(n_bank: int, n_query: int, dim: int, classes: int, noise: float, seed: int):
    """Bank and query features (unit rows, float32) and labels around random class centres.

    The noise norm grows as dim**0.25 so the accuracy stays about the same across dims.
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    out = []
    for n in (n_bank, n_query):
        y = torch.randint(0, classes, (n,), generator=g)
        x = centres[y] + noise * (dim / 384) ** 0.25 / dim**0.5 * torch.randn(n, dim, generator=g)
        out += [torch.nn.functional.normalize(x, dim=1), y]
    return out


def vote(sims: torch.Tensor, neighbour_y: torch.Tensor, truth: torch.Tensor, ks, classes):
    """Correct-prediction counts per k: scatter exp(sim / T) into each neighbour's class."""
    weights = (sims / TEMPERATURE).exp()
    correct = {}
    for k in ks:
        scores = torch.zeros(sims.shape[0], classes)
        scores.scatter_add_(1, neighbour_y[:, :k], weights[:, :k])
        correct[k] = int((scores.argmax(1) == truth).sum())
    return correct


def run_ours(data: dict, ks, classes) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    _, bank, bank_y = gather_by_index(data["bank_index"], data["bank_shuffled"],
                                      data["bank_y_shuffled"])  # fmt: skip
    _, query, query_y = gather_by_index(data["query_index"], data["query"], data["query_y"])
    gather_s = time.perf_counter() - t0
    acc = knn_accuracy(bank, bank_y, query, query_y, ks=ks, temperature=TEMPERATURE,
                       num_classes=classes)  # fmt: skip
    return acc, {"gather_s": gather_s}


def run_faiss(data: dict, ks, classes) -> tuple[dict, dict]:
    bank, query = data["bank"].numpy(), data["query"].numpy()
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank)
    sims, idx = index.search(query, max(ks))
    search_s = time.perf_counter() - t0
    neighbour_y = data["bank_y"][torch.from_numpy(idx)]
    correct = vote(torch.from_numpy(sims), neighbour_y, data["query_y"], ks, classes)
    return {k: c / len(query) for k, c in correct.items()}, {"search_s": search_s}


def run_torch(data: dict, ks, classes, chunk: int) -> tuple[dict, dict]:
    bank, query = data["bank"], data["query"]
    correct = dict.fromkeys(ks, 0)
    search_s = 0.0
    for start in range(0, len(query), chunk):
        t0 = time.perf_counter()
        sims, idx = (query[start : start + chunk] @ bank.T).topk(max(ks), dim=1)
        search_s += time.perf_counter() - t0
        part = vote(sims, data["bank_y"][idx], data["query_y"][start:start + chunk], ks,
                    classes)  # fmt: skip
        for k in ks:
            correct[k] += part[k]
    return {k: c / len(query) for k, c in correct.items()}, {"search_s": search_s}


def bench_setting(n_bank, n_query, dim, threads, args) -> list[dict]:
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    bank, bank_y, query, query_y = make_features(n_bank, n_query, dim, args.classes,
                                                 args.noise, args.seed)  # fmt: skip
    g = torch.Generator().manual_seed(args.seed + 1)
    perm = torch.randperm(n_bank, generator=g)  # the order DDP ranks would deliver rows in
    data = {"bank": bank, "bank_y": bank_y, "query": query, "query_y": query_y,
            "bank_shuffled": bank[perm], "bank_y_shuffled": bank_y[perm], "bank_index": perm,
            "query_index": torch.arange(n_query)}  # fmt: skip
    ks = sorted(args.ks)
    methods = {
        "ours": lambda: run_ours(data, ks, args.classes),
        "faiss": lambda: run_faiss(data, ks, args.classes),
        "torch": lambda: run_torch(data, ks, args.classes, args.chunk),
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    parts: dict[str, list[dict]] = {m: [] for m in methods}
    acc: dict[str, dict] = {}
    for _ in range(args.reps):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            acc[name], extra = fn()
            times[name].append(time.perf_counter() - t0)
            parts[name].append(extra)
    ref = acc["ours"]
    max_diff = max(abs(acc[m][k] - ref[k]) for m in methods for k in ks)
    if max_diff > 1e-3:
        raise AssertionError(f"accuracies differ by {max_diff}: {acc}")
    best_ours = min(times["ours"])
    rows = []
    for name in methods:
        best = min(times[name])
        extra_key = next(iter(parts[name][0]))
        rows.append({
            "method": name, "bank": n_bank, "queries": n_query, "dim": dim,
            "threads": threads, "reps": args.reps,
            "best_ms": round(best * 1e3, 1),
            "median_ms": round(statistics.median(times[name]) * 1e3, 1),
            "x_ours": round(best_ours / best, 2),
            extra_key.replace("_s", "_ms"): round(min(p[extra_key] for p in parts[name]) * 1e3, 1),
            "accuracy": {str(k): round(v, 4) for k, v in acc[name].items()},
            "max_abs_acc_diff_vs_ours": max(abs(acc[name][k] - ref[k]) for k in ks),
        })  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--banks", type=int, nargs="+", default=[10000, 50000])
    ap.add_argument("--queries", type=int, nargs="+", default=[2000])
    ap.add_argument("--dims", type=int, nargs="+", default=[384], help="384 = ViT-S/16")
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument(
        "--noise",
        type=float,
        default=4.0,
        help="noise norm over the unit class centres at dim 384: sets the accuracy (~0.5-0.9)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1],
        help="torch and FAISS (OpenMP) threads, e.g. 1 2",
    )
    ap.add_argument("--reps", type=int, default=3, help="timed calls per method (best-of)")
    ap.add_argument("--chunk", type=int, default=1024, help="query rows per torch matmul")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if min(args.banks) < max(args.ks):
        ap.error("every bank must hold at least max(--ks) items")

    settings = list(itertools.product(args.dims, args.banks, args.queries, args.threads))
    t_start = time.perf_counter()
    bench_setting(2000, 200, args.dims[0], args.threads[0], args)  # warm-up, not reported
    rows = []
    for dim, n_bank, n_query, threads in tqdm(settings, desc="kNN settings", unit="setting"):
        rows += bench_setting(n_bank, n_query, dim, threads, args)
    elapsed = time.perf_counter() - t_start

    print(f"\n{'method':>6} {'bank':>6} {'queries':>7} {'dim':>5} {'thr':>3} {'ms':>8} "
          f"{'ms med':>8} {'search ms':>9} {'x ours':>6}  acc@" + "/".join(map(str, args.ks))
          + "  max |dacc|")  # fmt: skip
    for r in rows:
        search = r.get("search_ms", r.get("gather_ms"))
        accs = "/".join(f"{r['accuracy'][str(k)]:.3f}" for k in sorted(args.ks))
        print(f"{r['method']:>6} {r['bank']:>6} {r['queries']:>7} {r['dim']:>5} "
              f"{r['threads']:>3} {r['best_ms']:>8.0f} {r['median_ms']:>8.0f} {search:>9.0f} "
              f"{r['x_ours']:>6.2f}  {accs}  {r['max_abs_acc_diff_vs_ours']:.4f}")  # fmt: skip
    print("(search ms: FAISS add+search or torch matmul+topk; for ours, gather_by_index ms)")
    print(f"total {elapsed:.0f} s")
    write_results(args, elapsed, {"rows": rows}, faiss=faiss.__version__)


if __name__ == "__main__":
    main()
