"""What every benchmark writes beside its printed table: machine facts, arguments, results."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def write_results(args, elapsed: float, results: dict, **versions: str) -> Path:
    """JSON at `args.out` with the machine, the CLI arguments and `results`."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    machine = {"cpu_count": os.cpu_count(), "processor": platform.processor() or None,
               "python": platform.python_version(), "torch": torch.__version__, **versions,
               "load_avg_1min": load}  # fmt: skip
    out = {"machine": machine,
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "elapsed_s": round(elapsed, 1), **results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return args.out
