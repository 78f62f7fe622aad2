"""Per-step schedules as precomputed arrays, indexed by the global step (as DINO's code does)."""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from `warmup_start` to `base`, then half a cosine from `base` to `final`.

    value(t) = final + (base - final) * (1 + cos(pi * t / T)) / 2 for t in [0, T) after warm-up.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else []
    t = np.arange(total_steps - warmup_steps)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(1, len(t))))
    return np.concatenate([np.asarray(warm, dtype=np.float64), cos])


def warmup_then_constant(start: float, end: float, warmup: int, total: int) -> np.ndarray:
    """Linear from `start` to `end` over `warmup` entries, then `end` (DINO teacher temperature)."""
    warmup = min(warmup, total)
    return np.concatenate([np.linspace(start, end, warmup), np.full(total - warmup, end)])


def at(schedule: np.ndarray, step: int) -> float:
    """Schedule value at `step`, holding the last value past the end (longer resumed runs)."""
    return float(schedule[min(max(step, 0), len(schedule) - 1)])
