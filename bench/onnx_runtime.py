"""Benchmark: ONNX Runtime vs PyTorch on the CPU, for the exported `embed` network.

Both run the same graph: uint8 images [B, 3, S, S] -> L2-normalised embeddings, PyTorch as
`module.embed` (eval mode, no grad) and ONNX Runtime on the file `shared.export.onnx` writes
(CPUExecutionProvider). Each (threads, batch) cell sets torch's intra-op threads and ORT's
`intra_op_num_threads` to the same number; repetitions alternate the two engines and the best
is reported (`img/s`, from the best rep; `ms med` the median), plus `x torch` = ORT images/s
over PyTorch's. The outputs must agree within 1e-4 (max abs), else the script fails.

    python bench/onnx_runtime.py                                  # DINO ResNet-18, 64 px
    python bench/onnx_runtime.py --overrides backbone=vit_tiny    # any ssl/ config override
    python bench/onnx_runtime.py --run-dir logs/ssl/dino/runs/<time>   # a trained run

Without --run-dir the weights are random (speed does not depend on them) and the inputs are
random images. Prints a table and writes bench/results/onnx_runtime.json.
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

import numpy as np
import torch

from shared.export.onnx import export_onnx, onnx_session

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_runtime.json"


def build(args):
    """(module, image size, description) from a run or from the ssl config."""
    if args.run_dir:
        from shared.run_loading import load_run

        run = load_run(args.run_dir, "best")
        return run.module, int(run.config.data.image_size), f"run {args.run_dir}"
    from shared.instantiate import instantiate
    from shared.tracking.compose import compose_pipeline

    cfg = compose_pipeline("ssl", list(args.overrides), tempfile.mkdtemp(), kind="bench")
    module = instantiate(cfg.module, "module").eval()
    size = args.image_size or int(cfg.data.image_size)
    return module, size, f"ssl {cfg.module._target_.rsplit('.', 1)[-1]} {cfg.backbone.name}"


def time_reps(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run-dir", default=None, help="benchmark a trained run instead")
    p.add_argument("--overrides", nargs="*", default=[], help="ssl config overrides")
    p.add_argument("--image-size", type=int, default=None, help="default: data.image_size")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    module, size, what = build(args)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = export_onnx(module, Path(tmp) / "model.onnx", size)
        export_s = time.perf_counter() - t0
        onnx_bytes = path.stat().st_size
        rows = []
        g = torch.Generator().manual_seed(0)
        for threads in args.threads:
            torch.set_num_threads(threads)
            session = onnx_session(path, threads)
            for batch in args.batches:
                x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
                x_np = x.numpy()
                with torch.no_grad():
                    ref = module.embed(x).numpy()
                got = session.run(["embeddings"], {"images": x_np})[0]
                diff = float(np.abs(got - ref).max())
                if diff > 1e-4:
                    raise SystemExit(f"ONNX and PyTorch differ by {diff:.2e} (batch {batch})")
                for _ in range(args.warmup):
                    module.embed(x)
                    session.run(["embeddings"], {"images": x_np})
                torch_t, ort_t = [], []
                for _ in range(args.reps):  # alternate, so load changes hit both alike
                    torch_t += time_reps(lambda x=x: module.embed(x), 1)
                    ort_t += time_reps(
                        lambda s=session, a=x_np: s.run(["embeddings"], {"images": a}), 1
                    )
                for engine, times in (("torch", torch_t), ("onnxruntime", ort_t)):
                    rows.append(
                        {
                            "engine": engine,
                            "threads": threads,
                            "batch": batch,
                            "ms": 1e3 * min(times),
                            "ms_median": 1e3 * statistics.median(times),
                            "images_per_s": batch / min(times),
                            "max_abs_diff": diff,
                        }
                    )
    print(
        f"\n{what}: uint8 [B, 3, {size}, {size}] -> embeddings; ONNX export {export_s:.1f} s, "
        f"{onnx_bytes / 1e6:.1f} MB"
    )
    print(
        f"{'engine':<12} {'threads':>7} {'batch':>6} {'ms':>9} {'ms med':>9} {'img/s':>9} "
        f"{'x torch':>8}"
    )
    speed = {(r["engine"], r["threads"], r["batch"]): r["images_per_s"] for r in rows}
    for r in rows:
        ratio = r["images_per_s"] / speed[("torch", r["threads"], r["batch"])]
        print(
            f"{r['engine']:<12} {r['threads']:>7} {r['batch']:>6} {r['ms']:>9.2f} "
            f"{r['ms_median']:>9.2f} {r['images_per_s']:>9.1f} {ratio:>8.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "cpu_count": os.cpu_count(),
                    "processor": platform.processor() or None,
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "onnxruntime": __import__("onnxruntime").__version__,
                    "load_avg_1min": load,
                },
                "args": {**vars(args), "what": what, "image_size": size},
                "export_seconds": export_s,
                "onnx_bytes": onnx_bytes,
                "results": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
