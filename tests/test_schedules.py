"""Schedules against their closed forms."""

import math

import numpy as np
import pytest

from shared.schedules import at, cosine_schedule, warmup_then_constant


def test_cosine_schedule_closed_form():
    base, final, total, warm = 1.0, 0.1, 50, 10
    s = cosine_schedule(base, final, total, warm, warmup_start=0.0)
    assert len(s) == total
    np.testing.assert_allclose(s[:warm], np.arange(warm) / warm * base)
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
