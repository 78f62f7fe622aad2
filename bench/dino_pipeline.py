"""Benchmark: images/s of the DINO multi-crop input pipeline, ours against the classic one.

Both pipelines read the same synthetic images (the `conf/data/source/synthetic.yaml` set,
pixel-identical) and produce the same views: 2 global + `n_local` local crops per image.

  ours      `build_store` (uint8 memmap) -> `StoreDataModule.train_dataloader()` (one
            `__getitems__` gather per batch, no per-sample work) -> `MultiCrop` on the whole
            batch, which is what `DINOModule.training_step` runs after the transfer.
  baseline  the same images as PNG files in an ImageFolder layout -> `ImageFolder` with the
            per-sample PIL transform of facebookresearch/dino `DataAugmentationDINO`
            (RandomResizedCrop bicubic, flip, ColorJitter p 0.8, grayscale 0.2, GaussianBlur
            p 1.0 / 0.1 / 0.5, solarize 0.2 on global 2, ToTensor + Normalize) -> default
            collate.
Kept apart on purpose: ours resamples crops bilinearly (`roi_align`), the baseline
bicubically; ours jitters in a fixed order, torchvision's ColorJitter in a random one. The
blur radius is scaled by crop size / 224 in both.

Same batch size, same num_workers, same cores. Warm-up batches are not timed; every
repetition times one epoch of each pipeline back to back (interleaved, so load from other
jobs hits both alike). Read the table as: `img/s` = source images per second through the
whole pipeline (each one becomes 2 + n_local crops), best epoch and median epoch; `x base`
= best img/s over the baseline's best img/s at the same num_workers (> 1: ours is faster).
`threads` is torch's intra-op thread count in the main process, where our augmentation
runs (default 1; `--threads 1 2` adds 2). The baseline runs at 1 thread: its PIL work is
single-threaded anyway, and DataLoader workers each use one thread. On a shared, loaded
machine 2 intra-op threads can be many times slower than 1 (each op waits for both). On a
GPU machine our augmentation would run on the device instead, so these CPU figures are its
worst case.

The store and the PNG folder are built once under `--root` (outside the timing) and reused.
A short torch.profiler run of `MultiCrop` names the hot stages and ops.

    python bench/dino_pipeline.py                        # module sizes 64/32/4, ~900 images
    python bench/dino_pipeline.py --workers 0 2 --reps 3
    python bench/dino_pipeline.py --with-dino-sizes      # add official 224/96/8 (256 px)

Prints tables and writes bench/results/dino_pipeline.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from _report import write_results
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from tqdm.auto import tqdm

from shared.data import augment
from shared.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCrop
from shared.data.datamodule import StoreDataModule
from shared.data.sources import SyntheticSource
from shared.data.synthetic import SyntheticProducts, write_class_folders

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "dino_pipeline.json"
# conf/data/source/synthetic.yaml, minus the size and family count the presets set.
SOURCE = {"groups_per_family": 4, "min_instances": 4, "max_instances": 10, "seed": 0}
GLOBAL_SCALE, LOCAL_SCALE = (0.4, 1.0), (0.05, 0.4)


# ---- baseline: facebookresearch/dino main_dino.py DataAugmentationDINO -------------------
class PILGaussianBlur:
    """Blur with probability p, radius ~ U(0.1, 2) scaled by size / 224 as ours does."""

    def __init__(self, p: float, size: int, radius=(0.1, 2.0)) -> None:
        self.p, self.scale, self.radius = p, size / 224, radius

    def __call__(self, img):
        if random.random() >= self.p:
            return img
        r = random.uniform(*self.radius) * self.scale
        return img.filter(ImageFilter.GaussianBlur(radius=r))


class PILSolarization:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class DataAugmentationDINO:
    """The official per-sample recipe; returns [global 1, global 2, local 1..n]."""

    def __init__(self, global_size: int, local_size: int, n_local: int) -> None:
        bicubic = transforms.InterpolationMode.BICUBIC
        flip_and_color_jitter = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        normalize = transforms.Compose(
            [
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        self.global1 = transforms.Compose(
            [
                transforms.RandomResizedCrop(global_size, GLOBAL_SCALE, interpolation=bicubic),
                flip_and_color_jitter,
                PILGaussianBlur(1.0, global_size),
                normalize,
            ]
        )
        self.global2 = transforms.Compose(
            [
                transforms.RandomResizedCrop(global_size, GLOBAL_SCALE, interpolation=bicubic),
                flip_and_color_jitter,
                PILGaussianBlur(0.1, global_size),
                PILSolarization(0.2),
                normalize,
            ]
        )
        self.local = transforms.Compose(
            [
                transforms.RandomResizedCrop(local_size, LOCAL_SCALE, interpolation=bicubic),
                flip_and_color_jitter,
                PILGaussianBlur(0.5, local_size),
                normalize,
            ]
        )
        self.n_local = n_local

    def __call__(self, img) -> list[torch.Tensor]:
        return [self.global1(img), self.global2(img)] + [
            self.local(img) for _ in range(self.n_local)
        ]


# ---- data preparation (not timed) ---------------------------------------------------------
def prepare(cfg: dict, root: Path, batch_size: int) -> tuple[StoreDataModule, Path, dict]:
    spec = {**SOURCE, "num_families": cfg["families"], "image_size": cfg["image_size"]}
    dm = StoreDataModule(
        SyntheticSource(**spec),
        str(root / "stores"),
        cfg["image_size"],
        batch_size=batch_size,
        store_name="bench-dino",
    )
    torch.set_num_threads(1)  # rendering is faster on one thread on a busy 2-core box
    t0 = time.perf_counter()
    dm.setup()
    store_s = time.perf_counter() - t0
    folder = root / "folders" / f"synthetic-{cfg['families']}f-{cfg['image_size']}px"
    t0 = time.perf_counter()
    write_class_folders(SyntheticProducts(**spec), folder, progress=False)
    png_s = time.perf_counter() - t0
    # Bench every row, not just the train split (one epoch = the same images for both).
    dm.train_indices = np.arange(len(dm.store))
    first = datasets.ImageFolder(str(folder)).samples[0][0]  # row 0 of the store too
    same = torch.equal(torch.from_numpy(np.array(Image.open(first).convert("RGB")))
                       .permute(2, 0, 1), dm.store.images[0])  # fmt: skip
    info = {
        "images": len(dm.store),
        "store_open_or_build_s": round(store_s, 2),
        "png_write_or_reuse_s": round(png_s, 2),
        "first_image_identical": same,
    }
    return dm, folder, info


def loaders(dm, folder, cfg, workers, batch_size):
    dm.num_workers = workers
    ours = dm.train_dataloader()
    tf = DataAugmentationDINO(cfg["global_size"], cfg["local_size"], cfg["n_local"])
    base = DataLoader(
        datasets.ImageFolder(str(folder), transform=tf),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    return ours, base


# ---- timing -------------------------------------------------------------------------------
def make_steps(cfg: dict) -> dict:
    mc = MultiCrop(cfg["global_size"], cfg["local_size"], cfg["n_local"])
    return {"ours": lambda b: mc(b["images"]), "baseline": lambda b: b[0]}


def run_epoch(loader, step, max_batches: int | None = None) -> tuple[int, float]:
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        views = step(batch)
        n += views[0].shape[0]
    return n, time.perf_counter() - t0


def describe_views(views: list[torch.Tensor], n_global: int = 2) -> dict:
    g, loc = torch.cat(views[:n_global]), torch.cat(views[n_global:])
    return {"global_shape": list(views[0].shape), "local_shape": list(views[-1].shape),
            "n_views": len(views), "global_mean": round(g.mean().item(), 3),
            "global_std": round(g.std().item(), 3), "local_mean": round(loc.mean().item(), 3),
            "local_std": round(loc.std().item(), 3)}  # fmt: skip


def bench_config(cfg: dict, args) -> dict:
    dm, folder, info = prepare(cfg, args.root, args.batch_size)
    steps = make_steps(cfg)
    rows, check = [], {}
    for workers in args.workers:
        ours, base = loaders(dm, folder, cfg, workers, args.batch_size)
        runs = [("baseline", base, 1)] + [("ours", ours, t) for t in args.threads]
        for name, loader, threads in runs:  # warm-up: workers start, caches fill
            torch.set_num_threads(threads)
            run_epoch(loader, steps[name], args.warmup_batches)
        if not check:
            check = {n: describe_views(steps[n](next(iter(ld)))) for n, ld, _ in runs[:2]}
            if (
                check["ours"]["global_shape"] != check["baseline"]["global_shape"]
                or check["ours"]["local_shape"] != check["baseline"]["local_shape"]
            ):
                raise AssertionError(f"views differ: {check}")
        times: dict[tuple, list[float]] = {(n, t): [] for n, _, t in runs}
        counts: dict[tuple, int] = {}
        bar = tqdm(
            total=args.reps * len(runs), unit="epoch", desc=f"{cfg['name']} workers={workers}"
        )
        for _ in range(args.reps):
            for name, loader, threads in runs:
                torch.set_num_threads(threads)
                n, dt = run_epoch(loader, steps[name])
                times[(name, threads)].append(dt)
                counts[(name, threads)] = n
                bar.set_postfix_str(f"{name}@{threads}t {n / dt:.0f} img/s")
                bar.update()
        bar.close()
        best_base = counts[runs[0][0], runs[0][2]] / min(times[runs[0][0], runs[0][2]])
        for name, _, threads in runs:
            ts, n = times[(name, threads)], counts[(name, threads)]
            rows.append(
                {
                    "config": cfg["name"],
                    "pipeline": name,
                    "workers": workers,
                    "threads": threads,
                    "images_per_epoch": n,
                    "epochs": len(ts),
                    "best_images_per_s": round(n / min(ts), 1),
                    "median_images_per_s": round(n / statistics.median(ts), 1),
                    "ratio_vs_baseline": round(n / min(ts) / best_base, 2),
                }
            )
        del runs, loader, ours, base  # stop the persistent workers before the next setting
    profile = profile_multicrop(dm, cfg, args) if args.profile_batches else None
    return {"config": cfg, "data": info, "view_check": check, "rows": rows, "profile": profile}


# ---- profile ------------------------------------------------------------------------------
STAGES = ("to_float", "random_resized_crop", "random_hflip", "color_jitter",
          "random_grayscale", "gaussian_blur", "random_solarize", "normalize")  # fmt: skip


def _labelled(name, fn):
    def wrapper(*a, **kw):
        with torch.profiler.record_function(f"stage::{name}"):
            return fn(*a, **kw)

    return wrapper


def profile_multicrop(dm, cfg, args) -> dict:
    """torch.profiler over `MultiCrop` on real batches: time per stage and per op."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads[0])
    mc = MultiCrop(cfg["global_size"], cfg["local_size"], cfg["n_local"])
    dm.num_workers = 0
    batches = [b["images"] for _, b in zip(range(args.profile_batches),
                                            dm.train_dataloader())]  # fmt: skip
    mc(batches[0])
    with ExitStack() as stack:  # MultiCrop looks these up in the module at call time
        for s in STAGES:
            stack.enter_context(mock.patch.object(augment, s, _labelled(s, getattr(augment, s))))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for x in batches:
                mc(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    stages = sorted(([e.key.removeprefix("stage::"), e.cpu_time_total / 1e3, e.count]
                     for e in events if e.key.startswith("stage::")),
                    key=lambda r: -r[1])  # fmt: skip
    ops = sorted(([e.key, e.self_cpu_time_total / 1e3, e.count] for e in events
                  if not e.key.startswith("stage::")), key=lambda r: -r[1])  # fmt: skip
    fmt = [{"name": n, "ms": round(ms, 1), "pct": round(100 * ms * 1e3 / total, 1),
            "calls": c} for n, ms, c in ops[:12]]  # fmt: skip
    return {
        "threads": args.threads[0],
        "batches": len(batches),
        "batch_size": args.batch_size,
        "total_self_cpu_ms": round(total / 1e3, 1),
        "stages": [
            {"name": n, "ms": round(ms, 1), "pct": round(100 * ms * 1e3 / total, 1), "calls": c}
            for n, ms, c in stages
        ],
        "top_ops": fmt,
    }


# ---- report -------------------------------------------------------------------------------
def print_report(res: dict) -> None:
    cfg, d = res["config"], res["data"]
    print(
        f"\ncrops {cfg['global_size']}/{cfg['local_size']}x{cfg['n_local']} "
        f"from {cfg['image_size']} px, {d['images']} images, batch {cfg['batch_size']}"
    )
    print(
        f"{'pipeline':>9} {'workers':>7} {'threads':>7} {'img/s best':>10} "
        f"{'img/s med':>9} {'x base':>6}"
    )
    for r in res["rows"]:
        print(
            f"{r['pipeline']:>9} {r['workers']:>7} {r['threads']:>7} "
            f"{r['best_images_per_s']:>10.0f} {r['median_images_per_s']:>9.0f} "
            f"{r['ratio_vs_baseline']:>6.2f}"
        )
    vc = res["view_check"]
    for n in ("ours", "baseline"):
        print(
            f"  views {n:>8}: {vc[n]['n_views']} views, global {vc[n]['global_shape']} "
            f"mean/std {vc[n]['global_mean']}/{vc[n]['global_std']}, local "
            f"{vc[n]['local_shape']} mean/std {vc[n]['local_mean']}/{vc[n]['local_std']}"
        )
    p = res["profile"]
    if p:
        print(
            f"  MultiCrop profile ({p['batches']} batches, {p['threads']} thread(s), "
            f"{p['total_self_cpu_ms']:.0f} ms self CPU)"
        )
        print("    stages: " + ", ".join(f"{s['name']} {s['pct']:.0f}%" for s in p["stages"]))
        print("    top ops: " + ", ".join(f"{o['name']} {o['pct']:.0f}%"
                                          for o in p["top_ops"][:8]))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--families",
        type=int,
        default=40,
        help="synthetic families; 40 = the data config (925 images)",
    )
    ap.add_argument("--image-size", type=int, default=64, help="stored image size (data config)")
    ap.add_argument("--global-size", type=int, default=64, help="module config multicrop")
    ap.add_argument("--local-size", type=int, default=32)
    ap.add_argument("--n-local", type=int, default=4)
    ap.add_argument(
        "--with-dino-sizes",
        action="store_true",
        help="also run the official sizes 224/96x8 from 256 px images",
    )
    ap.add_argument(
        "--dino-families",
        type=int,
        default=8,
        help="families for the official-size run (8 = 182 images)",
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1],
        help="torch intra-op threads for ours, e.g. 1 2 (the baseline always runs at 1)",
    )
    ap.add_argument("--reps", type=int, default=3, help="timed epochs per pipeline (best-of)")
    ap.add_argument("--warmup-batches", type=int, default=3)
    ap.add_argument("--profile-batches", type=int, default=4, help="0 turns profiling off")
    ap.add_argument(
        "--root",
        type=Path,
        default=REPO / "data" / "bench",
        help="where the store and PNG folder are built (reused across runs)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    configs = [(args.image_size, args.families, args.global_size, args.local_size, args.n_local)]
    if args.with_dino_sizes:
        configs.append((256, args.dino_families, 224, 96, 8))
    keys = ("image_size", "families", "global_size", "local_size", "n_local")
    configs = [{"name": f"{c[2]}/{c[3]}x{c[4]}", **dict(zip(keys, c))} for c in configs]
    random.seed(0)  # the baseline's PIL transforms draw from `random`, ours from torch
    torch.manual_seed(0)
    t_start = time.perf_counter()
    results = []
    for cfg in configs:
        cfg["batch_size"] = args.batch_size
        res = bench_config(cfg, args)
        results.append(res)
        print_report(res)
    elapsed = time.perf_counter() - t_start
    print(f"\ntotal {elapsed:.0f} s")
    write_results(args, elapsed, {"runs": results})


if __name__ == "__main__":
    main()
