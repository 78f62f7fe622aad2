"""Benchmark: the product-matching service under hostile load, on loopback.

Starts the service as bench/serve_load.py does (same model and gallery options) and runs,
`--duration` seconds each, while a probe times GET /health every 0.2 s:

    large     `--large-clients` clients sending one image of `--large-side`^2 pixels each
    many      clients sending `--files` images of 2,800^2 pixels per request (7.8 Mpx each)
    stalled   `--stalled` connections sending headers and half a body, then nothing, while
              4 clients send ordinary /match requests; then: how many did the server close?
    crowd     `--crowd` concurrent clients sending ordinary /match requests

Per scenario: the server's peak RSS, /health p50 / max latency, completed requests/s,
answers by status, client errors, and the lines the server logged. The server runs with
`--nofile` open files at most, so the stalled connections reach the limit (the log flood of
an unpatched server). Compare versions with `--server-code <checkout>`:

    python bench/serve_hostile.py
    python bench/serve_hostile.py --server-code /tmp/base   # git archive <commit> | tar -x -C

Prints a table and writes bench/results/serve_hostile.json.
"""

from __future__ import annotations

import collections
import io
import resource
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from _report import write_results
from PIL import Image
from serve_load import arguments, peak_rss_mb, reset_peak_rss, running_server

RESULTS = Path(__file__).resolve().parent / "results" / "serve_hostile.json"


def gradient_png(side: int) -> bytes:
    """A `side` x `side` PNG that compresses well (small upload) but decodes in full."""
    row = np.linspace(0, 255, side, dtype=np.uint8)
    img = np.broadcast_to(row[None, :, None], (side, side, 3))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def multipart(blobs: list[bytes], boundary: str = "hostile") -> tuple[bytes, str]:
    parts = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i}.png"'
            "\r\nContent-Type: image/png\r\n\r\n"
        ).encode()
        + blob
        + b"\r\n"
        for i, blob in enumerate(blobs)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), boundary


def clients(url: str, n: int, uploads, stop: threading.Event, tally: collections.Counter):
    """`n` threads posting /match back to back until `stop`; status codes counted."""
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            j = i
            while not stop.is_set():
                files = uploads[j % len(uploads)]
                j += n
                try:
                    key = c.post("/match", files=files).status_code
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                with lock:
                    tally[key] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def stall(url: str, count: int) -> list[socket.socket]:
    """`count` connections that send a request head and half of the promised body."""
    host, port = url.removeprefix("http://").split(":")
    body, boundary = multipart([b"\x89PNG" + b"\0" * 20_000])
    head = (
        f"POST /match HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect((host, int(port)))
            s.sendall(head + body[: len(body) // 2])
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


def closed_by_server(socks: list[socket.socket], wait_s: float) -> tuple[int, float]:
    """How many of the stalled connections the server answered or closed within `wait_s`,
    and the seconds until the last of those."""
    import selectors

    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    t0, last, closed = time.monotonic(), 0.0, 0
    while closed < len(socks) and (left := wait_s - (time.monotonic() - t0)) > 0:
        for key, _ in sel.select(timeout=min(left, 0.5)):
            sel.unregister(key.fileobj)
            closed, last = closed + 1, time.monotonic() - t0
    for s in socks:
        s.close()
    return closed, round(last, 1)


def scenario(url: str, pid: int, log_path: Path, duration: float, start_load) -> dict:
    """Run `start_load(stop, tally)` (-> its client threads, and a function giving extra
    figures) for `duration` s while probing /health; then let the requests in flight finish
    (peak memory often comes after the window) and read the figures."""
    reset_peak_rss(pid)
    log_before = log_path.stat().st_size
    lines_before = log_path.read_bytes().count(b"\n")
    stop, tally, health = threading.Event(), collections.Counter(), []

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = c.get("/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                health.append((time.perf_counter() - t0, ok))
                time.sleep(0.2)

    prober = threading.Thread(target=probe, daemon=True)
    t0 = time.perf_counter()
    prober.start()
    threads, extra = start_load(stop, tally)
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    elapsed = time.perf_counter() - t0
    prober.join(timeout=60)
    extra = extra() if extra else {}
    times = np.array([dt for dt, _ in health]) * 1e3
    return {
        "peak_rss_mb": peak_rss_mb(pid),
        "health_p50_ms": round(float(np.median(times)), 1) if len(times) else None,
        "health_max_ms": round(float(times.max()), 1) if len(times) else None,
        "health_failed": sum(not ok for _, ok in health),
        "seconds": round(elapsed, 1),  # the window and the requests' drain
        "ok_per_s": round(tally[200] / elapsed, 2),
        "answers": {str(k): v for k, v in sorted(tally.items(), key=str)},
        "log_lines": log_path.read_bytes().count(b"\n") - lines_before,
        "log_bytes": log_path.stat().st_size - log_before,
        **extra,
    }


def main() -> None:
    p = arguments(__doc__)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    p.add_argument("--large-side", type=int, default=7_900, help="side of the large images")
    p.add_argument("--large-clients", type=int, default=8)
    p.add_argument("--files", type=int, default=16, help="images per request in `many`")
    p.add_argument("--stalled", type=int, default=1_000)
    p.add_argument("--stall-wait", type=float, default=40.0, help="for the server to close")
    p.add_argument("--crowd", type=int, default=48)
    p.add_argument("--nofile", type=int, default=512, help="the server's open-file limit")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    t_all = time.perf_counter()
    large = [[("files", ("large.png", gradient_png(args.large_side), "image/png"))]]
    medium = gradient_png(2_800)
    many = [[("files", (f"{i}.png", medium, "image/png")) for i in range(args.files)]]
    rows = {}
    limit = (args.nofile, args.nofile)
    preexec = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit)  # noqa: E731
    with running_server(args, preexec) as (url, info, log_path):
        pid = info["pid"]
        small = [
            [("files", (Path(q).name, Path(q).read_bytes(), "image/png"))]
            for q in info.pop("query_images")
        ]

        def load(n, uploads):
            return lambda stop, tally: (clients(url, n, uploads, stop, tally), None)

        def stalled(stop, tally):
            socks = stall(url, args.stalled)
            threads = clients(url, 4, small, stop, tally)

            def settle():
                closed, last = closed_by_server(socks, args.stall_wait)
                return {
                    "stalled_open": len(socks),
                    "stalled_closed": closed,
                    "closed_after_s": last,
                }

            return threads, settle

        plan = {
            "large": load(args.large_clients, large),
            "many": load(4, many),
            "stalled": stalled,
            "crowd": load(args.crowd, small),
        }
        for name, start_load in plan.items():
            rows[name] = scenario(url, pid, log_path, args.duration, start_load)
            print(f"  {name}: {rows[name]}", flush=True)
            time.sleep(2)  # let the last requests finish before the next scenario

    print(
        f"\nhostile load, {args.duration:g} s per scenario: server "
        f"{args.server_code or 'this checkout'}, conf overrides {args.set or 'none'}, "
        f"open-file limit {args.nofile}"
    )
    print(
        f"{'scenario':>9} {'seconds':>7} {'peak RSS MB':>11} {'health p50/max ms':>18} "
        f"{'ok req/s':>9} {'log lines':>9}  answers"
    )
    for name, r in rows.items():
        health = f"{r['health_p50_ms']}/{r['health_max_ms']}"
        extra = ""
        if name == "stalled":
            extra = (
                f"  stalled closed {r['stalled_closed']}/{r['stalled_open']} "
                f"(last {r['closed_after_s']} s after the scenario)"
            )
        print(
            f"{name:>9} {r['seconds']:>7} {r['peak_rss_mb'] or 0:>11.0f} {health:>18} "
            f"{r['ok_per_s']:>9.1f} "
            f"{r['log_lines']:>9}  {r['answers']}{extra}"
        )
    write_results(args, time.perf_counter() - t_all, {"server": info, "scenarios": rows})


if __name__ == "__main__":
    main()
