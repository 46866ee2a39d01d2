"""lr_at is a pure function of (step, Schedule): warmup, cosine/linear/constant decay, clamping."""

import math

import pytest

from cptflow.train.schedule import Schedule, lr_at, make_schedule


def test_warmup_rises_linearly_to_peak():
    s = Schedule(lr=1e-3, min_lr=1e-4, warmup_steps=4, total_steps=20, kind="cosine")
    got = [lr_at(i, s) for i in range(5)]
    assert got[:4] == pytest.approx([1e-3 * k / 5 for k in (1, 2, 3, 4)])
    assert got[4] == pytest.approx(1e-3)  # first decay step starts at the peak
    assert all(a < b for a, b in zip(got, got[1:]))


def test_cosine_midpoint_and_floor():
    s = Schedule(lr=1.0, min_lr=0.1, warmup_steps=0, total_steps=100, kind="cosine")
    assert lr_at(0, s) == pytest.approx(1.0)
    assert lr_at(50, s) == pytest.approx(0.55)  # half way: mean of lr and min_lr
    assert lr_at(99, s) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.99)))
    assert lr_at(10_000, s) == pytest.approx(0.1)  # past the end: stays at the floor
    assert all(lr_at(i, s) >= lr_at(i + 1, s) for i in range(150))


def test_linear_and_constant():
    lin = Schedule(lr=1.0, min_lr=0.0, warmup_steps=10, total_steps=110, kind="linear")
    assert lr_at(10, lin) == pytest.approx(1.0)
    assert lr_at(60, lin) == pytest.approx(0.5)
    assert lr_at(110, lin) == pytest.approx(0.0)
    const = Schedule(lr=3e-4, min_lr=0.0, warmup_steps=2, total_steps=10, kind="constant")
    assert [lr_at(i, const) for i in range(2, 10)] == [3e-4] * 8


def test_lr_at_is_pure():
    s = Schedule(lr=2e-4, min_lr=2e-5, warmup_steps=3, total_steps=30, kind="cosine")
    first = [lr_at(i, s) for i in range(30)]
    # Out-of-order and repeated calls give the same floats: no hidden counter (what resume relies on).
    assert [lr_at(i, s) for i in reversed(range(30))][::-1] == first
    assert [lr_at(i, s) for i in range(30)] == first


def test_warmup_longer_than_stage_is_clamped(caplog):
    s = make_schedule(1e-3, 1e-4, warmup_steps=50, total_steps=10, kind="cosine")
    assert s.warmup_steps == 10
    assert "clamped" in caplog.text
    assert lr_at(9, s) == pytest.approx(1e-3 * 10 / 11)


@pytest.mark.parametrize("kw", [dict(kind="exp"), dict(total_steps=0), dict(min_lr=2.0), dict(warmup_steps=-1)])
def test_bad_schedules_are_rejected(kw):
    args = dict(lr=1.0, min_lr=0.1, warmup_steps=0, total_steps=10, kind="cosine") | kw
    with pytest.raises(ValueError):
        Schedule(**args)
    with pytest.raises(ValueError):
        lr_at(-1, Schedule(lr=1.0, min_lr=0.1, warmup_steps=0, total_steps=10))
