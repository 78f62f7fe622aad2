"""Schedules against their closed forms."""

import math

import numpy as np
import pytest

from shared.schedules import at, cosine_schedule, warmup_then_constant


def test_cosine_schedule_closed_form():
    """DINO's own construction: np.linspace(start, base, warm) (both ends), then the cosine."""
    base, final, total, warm = 1.0, 0.1, 50, 10
    s = cosine_schedule(base, final, total, warm, warmup_start=0.0)
    assert len(s) == total
    np.testing.assert_allclose(s[:warm], np.linspace(0.0, base, warm))
    assert s[warm - 1] == base  # the warm-up ends at base, as DINO's does
    for t in range(total - warm):
        expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / (total - warm)))
        assert s[warm + t] == pytest.approx(expected)
    assert s[warm] == pytest.approx(base)
    assert np.all(np.diff(s[warm:]) <= 0)


def test_momentum_schedule_reaches_one():
    s = cosine_schedule(0.996, 1.0, 1000)
    assert s[0] == pytest.approx(0.996)
    assert s[-1] == pytest.approx(1.0, abs=1e-7)
    assert at(s, 10_000) == s[-1]  # holds the last value past the end


def test_teacher_temperature_warmup():
    s = warmup_then_constant(0.04, 0.07, 30, 100)
    assert s[0] == pytest.approx(0.04) and s[29] == pytest.approx(0.07)
    assert np.all(s[30:] == 0.07)
    np.testing.assert_allclose(np.diff(s[:30]), 0.03 / 29)


def test_metric_learning_lr_factor_is_the_same_schedule():
    """The LambdaLR factor: (step + 1) / warmup during warm-up, then the cosine to min_ratio."""
    from shared.modules.metric_learning import WarmupCosine

    factor = WarmupCosine(warmup=5, total=40, min_ratio=0.01)
    got = np.array([factor(step) for step in range(40)])
    np.testing.assert_allclose(got[:5], (np.arange(5) + 1) / 5)
    t = np.arange(35) / 35
    np.testing.assert_allclose(got[5:], 0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * t)))
    assert factor(1000) == got[-1]
