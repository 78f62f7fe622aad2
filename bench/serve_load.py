"""Benchmark: POST /match of the product-matching service under load, on loopback.

Starts the real service (uvicorn, in a subprocess of this script, built as serve.py builds
it) and sends /match requests, one gallery image each, from N concurrent clients (threads,
one keep-alive httpx.Client each) for `--duration` seconds after `--warmup` seconds, for
every N in `--concurrency`. Reports completed requests/s, latency p50 / p95 / p99 and
errors. Before it serves, the server times the stages of a single request itself (decode
the upload, embed it at batch 1, search the gallery; medians of `--reps`), to show where
the time goes.

    python bench/serve_load.py                        # DOLG ResNet-18 at 64 px, synthetic gallery
    python bench/serve_load.py --run-dir logs/product-matching/dolg/runs/<time>
    python bench/serve_load.py --onnx model.onnx --threshold 0.6   # ONNX Runtime backend
    python bench/serve_load.py --concurrency 1 4 8 --duration 20
    python bench/serve_load.py --set max_batch=1               # batching off
    python bench/serve_load.py --server-code /tmp/base         # the server of another checkout

Without --run-dir the weights are random (speed does not depend on them) and the gallery is
the default run's synthetic postings. Clients and server share the machine, so on few cores
the clients' own CPU use lowers the figures. Prints a table and writes
bench/results/serve_load.json. `--server-code` runs the server from another checkout of the
repository (e.g. `git archive <commit> | tar -x -C /tmp/base`), for before/after figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from _report import write_results

RESULTS = Path(__file__).resolve().parent / "results" / "serve_load.json"


# ----------------------------------------------------------------------------- the server


def serve_config(args, data_dir: str, csv: Path | None):
    """conf/serve.yaml with the benchmark's overrides, composed as serve.py composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from shared.config import REPO_ROOT, prepare_environment

    prepare_environment()
    overrides = [f"port={args.port}", f"data_dir={data_dir}", "log_level=warning", *args.set]
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.onnx:
        overrides.append(f"onnx={args.onnx}")
    if csv is not None:
        overrides += [f"gallery={csv}", f"gallery_image_dir={csv.parent / 'images'}"]
    if args.threshold is not None:
        overrides.append(f"threshold={args.threshold}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose(config_name="serve", overrides=overrides)


def untrained_model(overrides: list[str], out_dir: str):
    """The default product-matching module (random weights) and its synthetic postings CSV."""
    from matching.service.embedder import TorchEmbedder
    from shared.data.sources import synthetic_postings
    from shared.instantiate import instantiate
    from shared.tracking.compose import compose_pipeline

    cfg = compose_pipeline("matching", overrides, out_dir, kind="bench")
    spec = {k: v for k, v in cfg.data.source.synthetic.items() if k != "_target_"}
    num_classes = spec["num_families"] * spec["groups_per_family"]
    module = instantiate(cfg.module, "module", num_classes=num_classes).eval()
    csv = synthetic_postings(cfg.data.source.synthetic_dir, spec)
    name = f"{type(module.net).__name__} {cfg.backbone.name} (untrained)"
    return TorchEmbedder(module, int(cfg.data.image_size), name, "untrained"), csv


def time_stages(service, paths: list[str], reps: int) -> dict:
    """Median ms of each stage of one /match request, run in this process."""
    from matching.service.images import decode_upload
    from shared.retrieval.threshold import MAX_NEIGHBOURS

    embedder, gallery, settings = service.embedder, service.gallery, service.settings
    blobs = [Path(p).read_bytes() for p in paths]
    times = {"decode": [], "embed": [], "search": []}
    for i in range(reps + 3):  # the first 3 warm up
        blob = blobs[i % len(blobs)]
        t0 = time.perf_counter()
        image, _ = decode_upload(blob, "q", embedder.image_size, settings.max_pixels)
        t1 = time.perf_counter()
        query = embedder.embed(image[None])
        t2 = time.perf_counter()
        gallery.search(query, max(settings.top_k, MAX_NEIGHBOURS))
        t3 = time.perf_counter()
        if i >= 3:
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(dt)
    return {f"{k}_ms": round(1e3 * statistics.median(v), 3) for k, v in times.items()}


def serve(args) -> None:
    """Server mode (run by the benchmark in a subprocess): build, time the stages, serve."""
    import torch
    import uvicorn

    from matching.service.app import build_app
    from matching.service.loading import build_service, load_model

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        csv = None
        if args.run_dir or args.onnx:
            if not args.run_dir:
                csv = untrained_model(args.overrides, tmp)[1]
            embedder, run = load_model(serve_config(args, f"{tmp}/serve", csv))
        else:
            embedder, csv = untrained_model(args.overrides, tmp)
            run = None
            if args.threshold is None:
                args.threshold = 0.5  # random weights: any threshold times the same
        cfg = serve_config(args, f"{tmp}/serve", csv)
        service = build_service(cfg, embedder, run)
        queries = [p.image for p in service.gallery.postings()[: args.queries]]
        info = {
            "model": embedder.name,
            "image_size": embedder.image_size,
            "embedding_dim": service.gallery.dim,
            "gallery_size": len(service.gallery),
            "threshold": service.settings.threshold,
            "torch_threads": torch.get_num_threads(),
            "one_request": time_stages(service, queries, args.reps),
            "query_images": queries,
        }
        Path(args.info).write_text(json.dumps(info))
        app = build_app(service.embedder, service.gallery, service.settings)
        try:
            from matching.service.server import server_config
        except ImportError:  # --server-code of a version without it
            uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
            return
        keys = ("max_connections", "header_timeout_s", "keep_alive_s")
        uvicorn.Server(
            server_config(app, "127.0.0.1", args.port, "warning", *(cfg[k] for k in keys))
        ).run()


# ----------------------------------------------------------------------------- the clients


def run_load(
    url: str, blobs: list[tuple[str, bytes]], clients: int, warmup: float, duration: float
):
    """`clients` threads posting /match back to back; figures from the measured window."""
    start = time.perf_counter()
    window = (start + warmup, start + warmup + duration)
    records: list[tuple[float, float, bool]] = []  # (start, end, ok)
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            j = i
            while (t0 := time.perf_counter()) < window[1]:
                name, blob = blobs[j % len(blobs)]
                j += clients
                try:
                    ok = c.post("/match", files=[("files", (name, blob, "image/png"))]).is_success
                except httpx.HTTPError:
                    ok = False
                with lock:
                    records.append((t0, time.perf_counter(), ok))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [r for r in records if window[0] <= r[1] <= window[1]]  # finished in the window
    latencies = np.array([end - t0 for t0, end, ok in records if t0 >= window[0] and ok])
    p50, p95, p99 = (1e3 * np.percentile(latencies, [50, 95, 99])) if len(latencies) else [0] * 3
    return {
        "clients": clients,
        "requests_per_s": round(sum(ok for *_, ok in done) / duration, 2),
        "p50_ms": round(float(p50), 1),
        "p95_ms": round(float(p95), 1),
        "p99_ms": round(float(p99), 1),
        "errors": sum(not ok for t0, _, ok in records if t0 >= window[0]),
        "requests": len(done),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reset_peak_rss(pid: int) -> None:
    """Start the process's peak-RSS count (VmHWM) afresh (Linux: clear_refs 5)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory of the process since start or the last reset, MB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    return round(kb / 1024, 1)


@contextlib.contextmanager
def running_server(args, preexec=None):
    """The service in a subprocess, answering /health: (url, server info, its log file). The
    server's stdout and stderr go to the log file (the hostile benchmark counts its lines)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        info_path, log_path = Path(tmp) / "info.json", Path(tmp) / "server.log"
        cmd = [sys.executable, __file__, "--serve", f"--port={port}", f"--info={info_path}"]
        cmd += [f"--reps={args.reps}", f"--queries={args.queries}"]
        for flag in ("run_dir", "onnx", "threshold", "torch_threads"):
            if getattr(args, flag) is not None:
                cmd.append(f"--{flag.replace('_', '-')}={getattr(args, flag)}")
        if args.overrides:
            cmd += ["--overrides", *args.overrides]
        if args.set:
            cmd += ["--set", *args.set]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args.server_code:
            root = Path(args.server_code).resolve()
            env["PYTHONPATH"] = os.pathsep.join(
                str(root / sub) for sub in ("", "ssl", "product-matching")
            )
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec
            )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + args.startup_timeout
            while True:
                try:
                    httpx.get(f"{url}/health", timeout=2).raise_for_status()
                    break
                except httpx.HTTPError:
                    if server.poll() is not None:
                        sys.stdout.write(log_path.read_text(errors="replace")[-3000:])
                        code = server.returncode
                        raise SystemExit(f"the server exited with code {code}") from None
                    if time.monotonic() > deadline:
                        limit = args.startup_timeout
                        raise SystemExit(f"the server did not answer in {limit} s") from None
                    time.sleep(0.5)
            info = json.loads(info_path.read_text())
            info["pid"] = server.pid
            yield url, info, log_path
        finally:
            server.terminate()
            server.wait(timeout=30)


def arguments(description: str) -> argparse.ArgumentParser:
    """The options every service benchmark shares (server, model, timing)."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run-dir", default=None, help="serve a trained run instead")
    p.add_argument("--onnx", default=None, help="serve this ONNX export (ONNX Runtime)")
    p.add_argument("--threshold", type=float, default=None, help="default: the run's")
    p.add_argument("--overrides", nargs="*", default=[], help="matching config overrides")
    p.add_argument("--set", nargs="*", default=[], help="conf/serve.yaml overrides, key=value")
    p.add_argument("--server-code", default=None, help="run the server from this checkout")
    p.add_argument("--queries", type=int, default=64, help="distinct gallery images sent")
    p.add_argument("--reps", type=int, default=30, help="single-request stage timings")
    p.add_argument("--torch-threads", type=int, default=None, help="server's (default torch's)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--info", default=None, help=argparse.SUPPRESS)
    return p


def main() -> None:
    p = arguments(__doc__)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per level")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.serve:
        serve(args)
        return

    t_all = time.perf_counter()
    with running_server(args) as (url, info, _):
        blobs = [(Path(q).name, Path(q).read_bytes()) for q in info.pop("query_images")]
        rows = []
        for clients in args.concurrency:
            reset_peak_rss(info["pid"])
            rows.append(run_load(url, blobs, clients, args.warmup, args.duration))
            rows[-1]["server_peak_rss_mb"] = peak_rss_mb(info["pid"])
            print(f"  {clients} client(s): {rows[-1]['requests_per_s']} req/s", flush=True)

    stages = info["one_request"]
    print(
        f"\nPOST /match, one {info['image_size']} px PNG per request: {info['model']}, gallery "
        f"{info['gallery_size']} postings, server torch threads {info['torch_threads']}, "
        f"{args.duration:g} s per level after {args.warmup:g} s warm-up"
    )
    print(
        f"one request inside the server (median of {args.reps}): decode {stages['decode_ms']:.2f}"
        f" ms, embed {stages['embed_ms']:.2f} ms, search {stages['search_ms']:.3f} ms"
    )
    print(f"server: {args.server_code or 'this checkout'}, conf overrides: {args.set or 'none'}")
    head = f"{'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}"
    print(f"{head} {'peak RSS MB':>12}")
    for r in rows:
        print(
            f"{r['clients']:>7} {r['requests_per_s']:>8.1f} {r['p50_ms']:>8.1f} "
            f"{r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['errors']:>7} "
            f"{r['server_peak_rss_mb'] or 0:>12.0f}"
        )
    write_results(args, time.perf_counter() - t_all, {"server": info, "results": rows})


if __name__ == "__main__":
    main()
