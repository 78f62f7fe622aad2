"""Per-step schedules as precomputed arrays, indexed by the global step (as DINO's code does)."""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """`warmup_cosine` at every step 0 .. total_steps - 1, as one array."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return warmup_cosine(
        np.arange(total_steps), base, final, total_steps, warmup_steps, warmup_start
    )


def warmup_cosine(step, base, final, total_steps, warmup_steps=0, warmup_start=0.0):
    """DINO's schedule (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
    Transformers", as in their code): a linear warm-up over `warmup_steps` steps from
    `warmup_start` to `base`, both ends included, then half a cosine from `base` to `final`:
    value(t) = final + (base - final) * (1 + cos(pi * t / T)) / 2, t in [0, T), T the steps
    after warm-up. `step` may be an int or an array; past the end the last value holds.
    """
    warmup_steps = min(int(warmup_steps), int(total_steps))
    step = np.minimum(np.asarray(step, dtype=np.float64), total_steps - 1)
    warm = warmup_start + (base - warmup_start) * step / max(1, warmup_steps - 1)
    after = total_steps - warmup_steps
    t = step - warmup_steps
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(1, after)))
    return np.where(step < warmup_steps, warm, cos)


def warmup_then_constant(start: float, end: float, warmup: int, total: int) -> np.ndarray:
    """Linear from `start` to `end` over `warmup` entries, then `end` (DINO teacher temperature)."""
    warmup = min(warmup, total)
    return np.concatenate([np.linspace(start, end, warmup), np.full(total - warmup, end)])


def at(schedule: np.ndarray, step: int) -> float:
    """Schedule value at `step`, holding the last value past the end (longer resumed runs)."""
    return float(schedule[min(max(step, 0), len(schedule) - 1)])
