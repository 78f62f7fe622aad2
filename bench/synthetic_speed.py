"""How fast the synthetic products set renders (and writes PNGs) on this machine's CPU.

    python bench/synthetic_speed.py                   # 64 and 96 px, batch 256, 1 and 2 threads
    python bench/synthetic_speed.py --sizes 64 --threads 4

Prints a table and writes bench/results/synthetic_speed.json. Steady-state figures are the
median over timed batches (distinct images each time); "cold" includes building the fixed
banks (masks, clutter atlas, noise strip) on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from shared.data.synthetic import (
    GENERATOR_VERSION,
    SyntheticProducts,
    SyntheticProductsSpec,
    write_image_folder_csv,
)

RESULTS = Path(__file__).resolve().parent / "results" / "synthetic_speed.json"


def bench_render(size: int, batch: int, batches: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    # Enough families that every timed batch renders new images.
    spec = SyntheticProductsSpec(num_families=max(40, batch * (batches + 1) // 15), image_size=size)
    products = SyntheticProducts(spec)
    t0 = time.perf_counter()
    products.render(range(batch))
    cold = time.perf_counter() - t0
    times = []
    for b in range(1, batches + 1):
        t0 = time.perf_counter()
        products.render(range(b * batch, (b + 1) * batch))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "image_size": size,
        "batch_size": batch,
        "threads": threads,
        "batches": batches,
        "cold_batch_s": round(cold, 4),
        "median_batch_s": round(med, 4),
        "images_per_s": round(batch / med, 1),
        "best_images_per_s": round(batch / min(times), 1),
    }


def bench_write(size: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    products = SyntheticProducts(num_families=60, image_size=size)
    products.render(range(8))  # build the banks outside the timing
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_image_folder_csv(products, Path(tmp) / "shop", progress=False)
        dt = time.perf_counter() - t0
    return {
        "image_size": size,
        "threads": threads,
        "images": len(products),
        "png_csv_images_per_s": round(len(products) / dt, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=8, help="timed batches per setting")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    render = [
        bench_render(s, args.batch_size, args.batches, t) for s in args.sizes for t in args.threads
    ]
    write = [bench_write(args.sizes[0], t) for t in args.threads]

    print(f"{'size':>5} {'threads':>7} {'batch':>5} {'img/s':>9} {'best img/s':>10} {'cold s':>7}")
    for r in render:
        print(
            f"{r['image_size']:>5} {r['threads']:>7} {r['batch_size']:>5} "
            f"{r['images_per_s']:>9.0f} {r['best_images_per_s']:>10.0f} "
            f"{r['cold_batch_s']:>7.2f}"
        )
    for w in write:
        print(
            f"write png+csv at {w['image_size']} px, {w['threads']} thread(s): "
            f"{w['png_csv_images_per_s']:.0f} img/s ({w['images']} images)"
        )
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    result = {
        "generator_version": GENERATOR_VERSION,
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_avg_1min": load,
        },
        "render": render,
        "write": write,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
