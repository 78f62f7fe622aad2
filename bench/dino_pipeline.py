"""Benchmark: images/s of the DINO multi-crop input pipeline, ours against the classic one.

Both pipelines read the same synthetic images (the `conf/data/source/synthetic.yaml` set,
pixel-identical) and produce the same views: 2 global + `n_local` local crops per image.

  ours      `build_store` (uint8 memmap) -> `StoreDataModule.train_dataloader()` (one
            `__getitems__` gather per batch) with `MultiCrop` as the loader's batch transform,
            i.e. what `DINOModule` sets up with `module.augment_in=auto` on the CPU: every
            loader worker reads a batch of rows and augments the whole batch (main process
            at 0 workers). On `--device cuda` ours is auto's GPU choice instead: the loader
            yields uint8, the batch moves to the GPU and `MultiCrop` runs there.
  baseline  the same images as PNG files in an ImageFolder layout -> `ImageFolder` with the
            per-sample PIL transform of facebookresearch/dino `DataAugmentationDINO`
            (RandomResizedCrop bicubic, flip, ColorJitter p 0.8, grayscale 0.2, GaussianBlur
            p 1.0 / 0.1 / 0.5, solarize 0.2 on global 2, ToTensor + Normalize) -> default
            collate (-> the device with `--device cuda`).
  ours-step (`--with-step`) the store loader yields uint8 and `MultiCrop` runs in the main
            process after it (the `augment_in=device` path on the CPU): only the reads are in
            the workers, so it shows what in-loader augmentation buys.
Kept apart on purpose: ours resamples crops bilinearly (antialiased, in uint8 like PIL), the
baseline bicubically; ours jitters in a fixed order, torchvision's ColorJitter in a random
one. The blur radius is scaled by crop size / 224 in both.

Same batch size, same num_workers (each worker one torch thread), same cores. Warm-up
batches are not timed; every repetition times one epoch of each pipeline back to back
(interleaved, so load from other jobs hits both alike). Read the table as: `img/s` = source
images per second through the whole pipeline (each one becomes 2 + n_local crops), best
epoch and median epoch; `x base` = best img/s over the baseline's best img/s at the same
num_workers (> 1: ours is faster). `threads` is torch's intra-op thread count in the main
process (default 1: on a shared machine 2 can be many times slower than 1).

After the tables, `MultiCrop` alone on store batches in the main process: its time with
whole-pixel and continuous boxes, the cost of each step (best times with the steps switched
on one at a time, differenced: noisy on a loaded machine, where a step can even come out
negative) and the top torch ops.

The store and the PNG folder are built once under `--root` (outside the timing) and reused.

    python bench/dino_pipeline.py                        # 64/32x4 and 224/96x8, workers 0 2
    python bench/dino_pipeline.py --no-dino-sizes --workers 0 2 --reps 5
    python bench/dino_pipeline.py --device cuda          # GPU augmentation vs CPU workers

Prints tables and writes bench/results/dino_pipeline.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _report import write_results
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from tqdm.auto import tqdm

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


def loaders(dm, folder, cfg, workers, batch_size, args) -> list[tuple[str, DataLoader]]:
    """(name, loader) of every pipeline at `workers` loader processes."""
    mc = MultiCrop(cfg["global_size"], cfg["local_size"], cfg["n_local"],
                   subpixel_boxes=cfg["subpixel_boxes"])  # fmt: skip
    on_gpu = args.device.type == "cuda"
    dm.num_workers, dm.pin_memory = workers, on_gpu
    dm.set_train_batch_transform(None if on_gpu else mc)  # augment_in=auto's choice
    ours = dm.train_dataloader()
    tf = DataAugmentationDINO(cfg["global_size"], cfg["local_size"], cfg["n_local"])
    base = DataLoader(
        datasets.ImageFolder(str(folder), transform=tf),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=on_gpu,
    )
    runs = [("baseline", base), ("ours", ours)]
    if args.with_step and not on_gpu:
        dm.set_train_batch_transform(None)
        runs.append(("ours-step", dm.train_dataloader()))
    dm.set_train_batch_transform(None)
    return runs


# ---- timing -------------------------------------------------------------------------------
def make_steps(cfg: dict, device: torch.device) -> dict:
    """What each pipeline does with a fetched batch; all end with the views on `device`."""
    mc = MultiCrop(cfg["global_size"], cfg["local_size"], cfg["n_local"],
                   subpixel_boxes=cfg["subpixel_boxes"])  # fmt: skip

    def ours(b):
        if "views" in b:  # augmented in the loader
            return b["views"]
        return mc(b["images"].to(device, non_blocking=True))

    def base(b):
        return [v.to(device, non_blocking=True) for v in b[0]]

    def step(b):
        return mc(b["images"])

    return {"ours": ours, "baseline": base, "ours-step": step}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_epoch(loader, step, device, max_batches: int | None = None) -> tuple[int, float]:
    sync(device)
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        views = step(batch)
        n += views[0].shape[0]
    sync(device)
    return n, time.perf_counter() - t0


def describe_views(views: list[torch.Tensor], n_global: int = 2) -> dict:
    g, loc = torch.cat(views[:n_global]), torch.cat(views[n_global:])
    return {"global_shape": list(views[0].shape), "local_shape": list(views[-1].shape),
            "n_views": len(views), "global_mean": round(g.mean().item(), 3),
            "global_std": round(g.std().item(), 3), "local_mean": round(loc.mean().item(), 3),
            "local_std": round(loc.std().item(), 3)}  # fmt: skip


def bench_config(cfg: dict, args) -> dict:
    dm, folder, info = prepare(cfg, args.root, args.batch_size)
    steps = make_steps(cfg, args.device)
    rows, check = [], {}
    for workers in args.workers:
        runs = loaders(dm, folder, cfg, workers, args.batch_size, args)
        runs = [(n, ld, 1 if n == "baseline" else t) for n, ld in runs
                for t in ([1] if n == "baseline" else args.threads)]  # fmt: skip
        for name, loader, threads in runs:  # warm-up: workers start, caches fill
            torch.set_num_threads(threads)
            run_epoch(loader, steps[name], args.device, args.warmup_batches)
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
            total=cfg["reps"] * len(runs), unit="epoch", desc=f"{cfg['name']} workers={workers}"
        )
        for _ in range(cfg["reps"]):
            for name, loader, threads in runs:
                torch.set_num_threads(threads)
                n, dt = run_epoch(loader, steps[name], args.device)
                times[(name, threads)].append(dt)
                counts[(name, threads)] = n
                bar.set_postfix_str(f"{name}@{threads}t {n / dt:.0f} img/s")
                bar.update()
        bar.close()
        best_base = counts["baseline", 1] / min(times["baseline", 1])
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
        del runs, loader  # stop the persistent workers before the next setting
    profile = profile_multicrop(dm, cfg, args) if args.profile_batches else None
    return {"config": cfg, "data": info, "view_check": check, "rows": rows, "profile": profile}


# ---- MultiCrop alone ----------------------------------------------------------------------
# Steps switched on one at a time; each row's time minus the previous row's is that step.
STAGES = [
    ("crop + normalize", dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0,) * 3,
                              solarize_p=0.0)),
    ("+ flip", dict(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0,) * 3, solarize_p=0.0)),
    ("+ colour jitter", dict(grayscale_p=0.0, blur_p=(0.0,) * 3, solarize_p=0.0)),
    ("+ grayscale", dict(blur_p=(0.0,) * 3, solarize_p=0.0)),
    ("+ blur", dict(solarize_p=0.0)),
    ("+ solarize (all)", {}),
]  # fmt: skip


def best_time(fn, batches, device, reps: int) -> list[float]:
    ts = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for x in batches:
            fn(x)
        sync(device)
        ts.append((time.perf_counter() - t0) / len(batches))
    return ts


def profile_multicrop(dm, cfg, args) -> dict:
    """MultiCrop on real store batches: per box kind, per step, top ops."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads[0])
    sizes = (cfg["global_size"], cfg["local_size"], cfg["n_local"])
    mc = MultiCrop(*sizes)
    dm.num_workers = 0
    batches = [b["images"].to(args.device) for _, b in zip(range(args.profile_batches),
                                                            dm.train_dataloader())]  # fmt: skip
    fns = {"MultiCrop": mc}
    fns["subpixel boxes"] = MultiCrop(*sizes, subpixel_boxes=True)  # roi_align crops
    fns.update({name: MultiCrop(*sizes, **kw) for name, kw in STAGES})
    for fn in fns.values():
        fn(batches[0])
    times = {k: [] for k in fns}
    for _ in tqdm(range(args.profile_reps), desc=f"{cfg['name']} MultiCrop", unit="rep"):
        for k, fn in fns.items():  # interleaved
            times[k] += best_time(fn, batches, args.device, 1)
    best = {k: min(v) * 1e3 for k, v in times.items()}
    stages, prev = [], 0.0
    for name, _ in STAGES:
        stages.append({"step": name, "ms_per_batch": round(best[name], 1),
                       "step_ms": round(best[name] - prev, 1)})  # fmt: skip
        prev = best[name]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type ==
                                           "cuda" else [])  # fmt: skip
    with profile(activities=activities) as prof:
        for x in batches:
            mc(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ops = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in events),
                 key=lambda r: -r[1])  # fmt: skip
    return {
        "threads": args.threads[0],
        "batches": len(batches),
        "batch_size": args.batch_size,
        "multicrop_ms_per_batch": round(best["MultiCrop"], 1),
        "multicrop_images_per_s": round(args.batch_size / best["MultiCrop"] * 1e3, 1),
        "subpixel_ms_per_batch": round(best["subpixel boxes"], 1),
        "stages": stages,
        "top_ops": [
            {"name": n, "ms": round(ms, 1), "pct": round(100 * ms * 1e3 / total, 1), "calls": c}
            for n, ms, c in ops[:10]
        ],
    }


# ---- report -------------------------------------------------------------------------------
def print_report(res: dict) -> None:
    cfg, d = res["config"], res["data"]
    print(
        f"\ncrops {cfg['global_size']}/{cfg['local_size']}x{cfg['n_local']} "
        f"from {cfg['image_size']} px, {d['images']} images, batch {cfg['batch_size']}, "
        f"{'continuous' if cfg['subpixel_boxes'] else 'whole-pixel'} boxes"
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
            f"  MultiCrop alone ({p['threads']} thread(s), batch {p['batch_size']}): "
            f"{p['multicrop_ms_per_batch']:.0f} ms/batch ({p['multicrop_images_per_s']:.0f} "
            f"img/s); with subpixel_boxes "
            f"{p['subpixel_ms_per_batch']:.0f} ms/batch"
        )
        print("    steps (ms/batch): " + ", ".join(f"{s['step']} {s['step_ms']:.0f}"
                                                    for s in p["stages"]))  # fmt: skip
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
    ap.add_argument("--reps", type=int, default=2, help="timed epochs per pipeline (best-of)")
    ap.add_argument(
        "--dino-sizes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the official sizes 224/96x8 from 256 px images",
    )
    ap.add_argument(
        "--dino-families",
        type=int,
        default=12,
        help="families for the official-size run (12 = 287 images, 4 batches of 64)",
    )
    ap.add_argument("--dino-reps", type=int, default=2, help="timed epochs at 224/96x8")
    ap.add_argument(
        "--subpixel-boxes",
        action="store_true",
        help="ours crops continuous boxes (module.multicrop.subpixel_boxes; the 64 px "
        "config's default); default: whole-pixel boxes, the official recipe",
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1],
        help="torch intra-op threads for ours in the main process, e.g. 1 2 (baseline: 1)",
    )
    ap.add_argument(
        "--with-step", action="store_true", help="add ours-step (augmenting after the loader)"
    )
    ap.add_argument("--warmup-batches", type=int, default=2)
    ap.add_argument(
        "--profile-batches", type=int, default=2, help="MultiCrop-alone batches; 0: skip"
    )
    ap.add_argument("--profile-reps", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda if available)")
    ap.add_argument(
        "--root",
        type=Path,
        default=REPO / "data" / "bench",
        help="where the store and PNG folder are built (reused across runs)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)

    configs = [
        (args.image_size, args.families, args.global_size, args.local_size, args.n_local,
         args.reps)
    ]  # fmt: skip
    if args.dino_sizes:
        configs.append((256, args.dino_families, 224, 96, 8, args.dino_reps))
    keys = ("image_size", "families", "global_size", "local_size", "n_local", "reps")
    sub = {"subpixel_boxes": args.subpixel_boxes}
    configs = [{"name": f"{c[2]}/{c[3]}x{c[4]}", **dict(zip(keys, c)), **sub} for c in configs]
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
    args.device = str(args.device)
    write_results(args, elapsed, {"runs": results})


if __name__ == "__main__":
    main()
