"""Where a run resumes from: an explicit `ckpt_path`, else its own `last.ckpt`."""

from __future__ import annotations

import logging
import os
import time
import zipfile
from pathlib import Path

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only

from shared.atomic import remove_stale_temps

log = logging.getLogger(__name__)


def resume_checkpoint(ckpt_path: str | None, output_dir: str | Path, auto: bool = True):
    """Explicit path wins; otherwise `<output_dir>/checkpoints/last.ckpt` when it exists.

    SLURM requeue and a plain restart with the same `hydra.run.dir` both land here. A
    `last.ckpt` cut short (a kill while it was being copied into place) is moved aside, not
    deleted, and the run resumes from its newest complete checkpoint instead of failing on
    every restart.
    """
    if ckpt_path:
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist")
        if problem := unreadable(path):
            raise ValueError(f"ckpt_path={str(path)!r} cannot be read: {problem}")
        return str(path)
    last = last_checkpoint(output_dir)
    folder = last.parent
    if not auto:
        return None
    first = rank_zero_only.rank == 0  # the other ranks of a DDP run only read
    if first:
        remove_stale_temps(folder, "*.ckpt")
    if last.is_file():
        problem = unreadable(last)
        if problem is None:
            log.info("Resuming from %s", last)
            return str(last)
        if first:
            aside = last.with_name(f"last.ckpt.damaged-{int(time.time())}")
            os.replace(last, aside)
            log.warning("%s is damaged (%s): moved to %s", last, problem, aside.name)
    elif not any(folder.glob("last.ckpt.damaged-*")):
        return None  # a fresh run
    # last.ckpt was damaged (set aside by this or an earlier start): the newest complete one
    older = sorted(folder.glob("*.ckpt"), key=os.path.getmtime, reverse=True)
    fallback = next((p for p in older if p.name != "last.ckpt" and not unreadable(p)), None)
    log.warning("Resuming from %s", fallback or "the start (no complete checkpoint left)")
    return str(fallback) if fallback else None


def last_checkpoint(output_dir: str | Path) -> Path:
    """The latest state of a run, what it resumes from (written after every validation, and
    at a preemption signal)."""
    return Path(output_dir) / "checkpoints" / "last.ckpt"


def unreadable(path: Path) -> str | None:
    """Why `path` is not a complete torch checkpoint (a zip archive whose directory, written
    last, is intact), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def check_compatible(ckpt: str, module) -> None:
    """Refuse a checkpoint of another module class or with different values of the
    hyper-parameters the module class declares `resume_sensitive` (shapes, meaning); the
    others (lr, schedules) may change on resume."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    expected = f"{type(module).__module__}.{type(module).__qualname__}"
    found = state.get("module_class")
    if found and found != expected:
        raise ValueError(f"checkpoint {ckpt} holds a {found}, but the config builds {expected}")
    saved = state.get("hyper_parameters", {})
    current = dict(module.hparams)
    sensitive = getattr(type(module), "resume_sensitive", frozenset())
    # A null in the config (e.g. num_classes) is filled from the data at setup: not a mismatch.
    diff = {
        k: (saved.get(k), current.get(k))
        for k in sensitive
        if current.get(k) is not None and saved.get(k) != current.get(k)
    }
    if diff:
        lines = ", ".join(
            f"{k}: checkpoint={a!r} config={b!r}" for k, (a, b) in sorted(diff.items())
        )
        raise ValueError(f"checkpoint {ckpt} does not match the config ({lines})")
