"""Benchmark: images/s of one whole DINO training epoch, ours against lightly's DINO; and ours
now against ours in another checkout (before a restructuring).

  ours     the README's default run, `python ssl/run.py` (conf/ssl.yaml: DINO on ResNet-18,
           the synthetic products at 64 px, batch 64, 2 x 64 + 4 x 32 px crops), composed with
           Hydra's compose API and run by `shared.train.run` for one epoch: Lightning, our data
           module (the store's uint8 batches, batched `MultiCrop` in the loader,
           `module.augment_in=auto`) and `DINOModule`. Overridden: 1 epoch, no validation
           (`limit_val_batches=0`), no test, no evaluation at init, no callbacks, logger or
           checkpointing, `data.num_workers`; the clock is a callback (`_quality.EpochTimer`).
  lightly  the same epoch in a plain loop around lightly's DINO: `DINOProjectionHead`,
           `DINOLoss`, `DINOTransform` (per-image PIL views in a DataLoader over the same
           store's train rows) and `update_momentum` (bench/quality_dino.py's `lightly_parts` /
           `lightly_step`: same backbone built the same way, same head sizes, optimiser,
           schedules and clipping as ours, same crops, batch 64, drop_last).

Both sides run in one process, at the same torch threads and the same number of loader
workers, interleaved (ours, lightly, ours, lightly, ...), each from freshly built networks.

What each time includes: `epoch s` runs from the epoch's start (before the loader's iterator
and its workers start) to the end of its last optimiser step: loading, augmentation, forward,
backward, optimiser, teacher update and, for ours, Lightning's loop and hooks. Building the
data module, the networks and the Trainer, and what follows the last step, are not counted.
`steps s` (in the JSON) starts at the first step instead, so it leaves out the loader's start
and first batch. img/s = images trained (steps x batch, drop_last) / epoch s.

`--before <checkout>` adds the second table: the same "ours" epoch run with that checkout's
code and conf/ against this tree's, each run of `--epochs` epochs (default 2: the first pays
one-off start-up such as a JIT compile, the second is the steady state) in a fresh subprocess
(`--worker`), before and now alternating, `--pairs` times, at the first `--workers` value.
Both trees must have `shared.train.run` and the overrides above (537e806, the tree issue #16
started from, has).

    python bench/dino_epoch.py                                 # workers 0 and 2, 3 reps each
    git worktree add /tmp/before-16 537e806
    python bench/dino_epoch.py --before /tmp/before-16 --pairs 3 --no-peer
    python bench/dino_epoch.py --before /tmp/before-16 --pairs 2 --no-peer --now-first
    python bench/dino_epoch.py --quick                         # 8 families, 1 rep: a smoke run

Prints the tables and writes bench/results/dino_epoch.json. Read ratios of the same pair (one
rep of each side, back to back), not absolute figures: on a shared machine load moves both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightly
import lightning as L
from _quality import (
    CONF,
    REPO,
    RESULTS,
    EpochTimer,
    compose,
    default_threads,
    quiet_lightning,
    set_threads,
)
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

QUICK = {"reps": 1, "families": 8, "pairs": 1, "epochs": 1}
RESULT_TAG = "DINO_EPOCH_RESULT "


def ours_overrides(workers: int, families: int | None, epochs: int = 1) -> list[str]:
    """Training epochs of the default run, nothing else, clocked by `EpochTimer`."""
    overrides = [
        "seed=0",
        f"trainer.max_epochs={epochs}",
        "+trainer.limit_val_batches=0",
        "+trainer.enable_checkpointing=false",
        "trainer.enable_progress_bar=false",
        "test=false",
        "eval_at_init=false",
        "optimized_metric=null",  # nothing is evaluated
        "logger=none",
        "callbacks=none",
        "+callbacks.epoch_timer._target_=_quality.EpochTimer",
        f"data.num_workers={workers}",
    ]
    if families:
        overrides.append(f"data.source.num_families={families}")
    return overrides


def ours_epochs(cfg) -> list[dict]:
    """`shared.train.run(cfg)` (Lightning's tables to /dev/null) and its epochs' clocks."""
    from shared.train import run

    EpochTimer.last = None
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        run(cfg)
    return [with_rate(e) for e in EpochTimer.last.epochs]


def lightly_epoch(cfg, workers: int) -> dict:
    """One epoch of lightly's DINO over the same store's train rows, clocked like ours."""
    from quality_dino import (
        StoreViews,
        lightly_parts,
        lightly_step,
        lightly_train_mode,
        lightly_transform,
    )

    from shared.instantiate import instantiate

    L.seed_everything(cfg.seed, workers=True)
    dm = instantiate(cfg.data, "data")
    dm.setup()
    views = StoreViews(dm.store, lightly_transform(OmegaConf.to_container(cfg.module.multicrop)))
    loader = DataLoader(Subset(views, list(dm.train_indices)), batch_size=cfg.data.batch_size,
                        shuffle=True, drop_last=True, num_workers=workers)  # fmt: skip
    parts = lightly_parts(cfg, len(loader), 1)
    lightly_train_mode(parts)
    t0, first, images = time.perf_counter(), None, 0
    for step, (crops, batch, _rows) in enumerate(loader):
        first = first or time.perf_counter()
        lightly_step(parts, crops, step, 0)
        images += len(batch)
    end = time.perf_counter()
    return {"epoch_s": end - t0, "steps_s": end - first, "steps": len(loader), "images": images}


def with_rate(run: dict) -> dict:
    return {**run, "img_s": run["images"] / run["epoch_s"]}


def spread(values: list[float]) -> dict:
    """Median, min and max (the figures a noisy shared machine allows)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}  # fmt: skip


# ---- part 1: ours against lightly, one process ----------------------------------------------
def peer_part(args, tmp: Path) -> list[dict]:
    rows = []
    for workers in args.workers:
        pairs = []
        for rep in tqdm(range(args.reps), desc=f"workers {workers}", unit="pair"):
            cfg = compose("ssl", ours_overrides(workers, args.families),
                          tmp / f"ours-{workers}-{rep}", args.root)  # fmt: skip
            (ours,) = ours_epochs(cfg)
            theirs = with_rate(lightly_epoch(cfg, workers))
            pairs.append({"ours": ours, "lightly": theirs, "load_1min": os.getloadavg()[0]})
            tqdm.write(f"workers {workers} rep {rep}: ours {ours['img_s']:.1f} img/s, "
                       f"lightly {theirs['img_s']:.1f} img/s")  # fmt: skip
        rows.append({
            "workers": workers,
            "ours_img_s": spread([p["ours"]["img_s"] for p in pairs]),
            "lightly_img_s": spread([p["lightly"]["img_s"] for p in pairs]),
            "ours_over_lightly": spread([p["ours"]["img_s"] / p["lightly"]["img_s"]
                                         for p in pairs]),
            "pairs": pairs,
        })  # fmt: skip
    return rows


# ---- part 2: ours before and now, a subprocess per epoch ------------------------------------
def worker_main(args) -> None:
    """`--worker <checkout>`: "ours" epochs on that checkout's code and conf/, as JSON."""
    set_threads(args.threads)
    quiet_lightning()
    with tempfile.TemporaryDirectory(prefix="dino_epoch_worker_") as tmp:
        overrides = ours_overrides(args.workers[0], args.families, args.epochs)
        cfg = compose("ssl", overrides, Path(tmp), args.root, conf=args.worker / "conf")
        epochs = ours_epochs(cfg)
    import shared

    code = str(Path(shared.__file__).resolve().parents[1])
    print(RESULT_TAG + json.dumps({"code": code, "epochs": epochs}), flush=True)


def run_worker(code: Path, args, root: Path) -> dict:
    """One epoch in a fresh interpreter that imports `code`'s packages (and conf/) only."""
    env = {k: v for k, v in os.environ.items() if k != "PROJECT_ROOT"}
    env["PYTHONPATH"] = os.pathsep.join(str(code / p) for p in ("", "ssl", "product-matching"))
    env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(code),
           "--workers", str(args.workers[0]), "--threads", str(args.threads),
           "--root", str(root), "--epochs", str(args.epochs)]  # fmt: skip
    if args.families:
        cmd += ["--families", str(args.families)]
    proc = subprocess.run(cmd, env=env, cwd=code, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker on {code} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")  # fmt: skip
    result = json.loads(lines[-1].removeprefix(RESULT_TAG))
    if Path(result["code"]) != code.resolve():
        raise SystemExit(f"worker imported {result['code']}, not {code}")
    return result


def before_part(args) -> dict:
    before, now = args.before.resolve(), REPO
    # each tree builds its own store (their formats may differ), once, before the timed pairs
    roots = {"before": args.root / "other-checkout", "now": args.root}
    pairs = []
    for i in tqdm(range(args.pairs), desc="before/now", unit="pair"):
        if args.now_first:
            b = run_worker(now, args, roots["now"])["epochs"]
            a = run_worker(before, args, roots["before"])["epochs"]
        else:
            a = run_worker(before, args, roots["before"])["epochs"]
            b = run_worker(now, args, roots["now"])["epochs"]
        pairs.append({"before": a, "now": b, "load_1min": os.getloadavg()[0]})
        tqdm.write(f"pair {i}: epoch s before {[round(e['epoch_s'], 1) for e in a]}, "
                   f"now {[round(e['epoch_s'], 1) for e in b]}")  # fmt: skip
    per_epoch = []
    for e in range(args.epochs):
        a = [p["before"][e]["epoch_s"] for p in pairs]
        b = [p["now"][e]["epoch_s"] for p in pairs]
        per_epoch.append({"epoch": e + 1, "before_s": spread(a), "now_s": spread(b),
                          "now_over_before": spread([y / x for x, y in zip(a, b)])})  # fmt: skip
    return {"before": str(before), "workers": args.workers[0], "now_first": args.now_first,
            "per_epoch": per_epoch,
            "pairs": pairs}  # fmt: skip


# ---- tables ---------------------------------------------------------------------------------
def cell(s: dict, digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def print_peer(rows: list[dict]) -> None:
    print("\nDINO epoch, images/s, median [min-max] over pairs (ours / lightly: per pair)")
    print(f"{'workers':>7} {'ours img/s':>20} {'lightly img/s':>20} {'ours / lightly':>20} "
          f"{'load':>9}")  # fmt: skip
    for r in rows:
        loads = [p["load_1min"] for p in r["pairs"]]
        print(
            f"{r['workers']:>7} {cell(r['ours_img_s']):>20} {cell(r['lightly_img_s']):>20} "
            f"{cell(r['ours_over_lightly'], 2):>20} {min(loads):>4.1f}-{max(loads):.1f}"
        )


def print_before(part: dict) -> None:
    print(f"\nours, epoch s, {part['before']} against now, a subprocess each, alternating")
    print(f"{'pair':>4} {'epoch':>5} {'before s':>9} {'now s':>9} {'now / before':>13} "
          f"{'load':>5}")  # fmt: skip
    for i, p in enumerate(part["pairs"]):
        for e, (a, b) in enumerate(zip(p["before"], p["now"])):
            a, b = a["epoch_s"], b["epoch_s"]
            print(f"{i:>4} {e + 1:>5} {a:>9.1f} {b:>9.1f} {b / a:>13.3f} {p['load_1min']:>5.1f}")
    for e in part["per_epoch"]:
        print(f"epoch {e['epoch']}: median [min-max] now / before {cell(e['now_over_before'], 3)}")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                    help="loader workers, both sides (part 2 uses the first)")  # fmt: skip
    ap.add_argument("--reps", type=int, default=3, help="ours / lightly pairs per worker count")
    ap.add_argument("--threads", type=int, default=default_threads(),
                    help="torch intra-op threads (default OMP_NUM_THREADS, else 1)")  # fmt: skip
    ap.add_argument("--families", type=int, default=None,
                    help="synthetic families (conf: 24); fewer = a shorter epoch")  # fmt: skip
    ap.add_argument("--root", type=Path, default=REPO / "data", help="data dir (stores)")
    ap.add_argument("--before", type=Path, default=None,
                    help="another checkout: time its epoch against this tree's")  # fmt: skip
    ap.add_argument("--pairs", type=int, default=3, help="before / now pairs")
    ap.add_argument("--epochs", type=int, default=2,
                    help="epochs per before / now run (the 1st pays one-off start-up)")  # fmt: skip
    ap.add_argument("--now-first", action="store_true",
                    help="this tree first in each pair (falling load favours the 2nd)")  # fmt: skip
    ap.add_argument("--no-peer", action="store_true", help="skip ours against lightly")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 8 families, 1 rep, 1 pair (about 2 minutes)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS / "dino_epoch.json")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.reps, args.families = QUICK["reps"], QUICK["families"]
        args.pairs, args.epochs = QUICK["pairs"], QUICK["epochs"]
    if args.before is not None and not (args.before / "conf" / "ssl.yaml").is_file():
        ap.error(f"--before {args.before}: no conf/ssl.yaml there (expected a checkout)")
    return args


def main() -> None:
    from _report import write_results

    args = parse_args()
    if args.worker is not None:
        return worker_main(args)
    set_threads(args.threads)
    quiet_lightning()
    t0 = time.perf_counter()
    results: dict = {"conf": str(CONF)}
    if not args.no_peer:
        with tempfile.TemporaryDirectory(prefix="dino_epoch_") as tmp:
            results["peer"] = peer_part(args, Path(tmp))
        print_peer(results["peer"])
    if args.before is not None:
        results["before_now"] = before_part(args)
        print_before(results["before_now"])
    write_results(args, time.perf_counter() - t0, results, lightly=lightly.__version__)


if __name__ == "__main__":
    main()
