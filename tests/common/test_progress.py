"""common.progress: the ETA of long work's log lines."""

from __future__ import annotations

import math

import pytest

from common.progress import Eta, format_seconds


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (44.6, "45 s"),
        (60, "1 min 00 s"),
        (200, "3 min 20 s"),
        (3599.4, "59 min 59 s"),
        (3900, "1 h 05 min"),
        (-3, "0 s"),
        (math.nan, "?"),
        (math.inf, "?"),
    ],
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


def test_eta_from_the_pace_so_far() -> None:
    clock = FakeClock()
    eta = Eta(12, clock=clock)
    assert math.isnan(eta.remaining()) and eta.text() == "ETA ?"
    clock.t += 30
    assert eta.step() == "ETA 5 min 30 s"  # 30 s a unit, 11 left
    clock.t += 10
    assert eta.step(2) == "ETA 2 min 00 s"  # 40 s for 3 units, 9 left
    assert eta.remaining() == pytest.approx(120.0)
    clock.t += 1
    assert eta.step(100) == "done"  # never past the total
    assert eta.done == 12 and eta.remaining() == 0.0


def test_weighted_units() -> None:
    """A study weighs its regimes: a heavy one left takes longer than a light one."""
    clock = FakeClock()
    eta = Eta(0.2 + 1.0 + 4.0, clock=clock)
    clock.t += 10
    eta.step(0.2)
    clock.t += 50
    eta.step(1.0)
    assert eta.remaining() == pytest.approx(60 / 1.2 * 4.0)


def test_skip_takes_resumed_work_out_without_speeding_the_pace() -> None:
    clock = FakeClock()
    eta = Eta(10, clock=clock)
    eta.skip(4)  # a resumed run: 4 units done by an earlier one
    assert eta.total == 6 and eta.done == 0
    clock.t += 20
    eta.step()
    assert eta.remaining() == pytest.approx(100.0)  # 20 s a unit, 5 left
    eta.skip(100)
    assert eta.total == eta.done == 1 and eta.text() == "done"


@pytest.mark.parametrize("total", [0, -1, math.nan, math.inf])
def test_bad_total_is_refused(total: float) -> None:
    with pytest.raises(ValueError, match="total"):
        Eta(total)


@pytest.mark.parametrize("units", [-1, math.nan, math.inf])
def test_bad_units_are_refused(units: float) -> None:
    eta = Eta(3)
    with pytest.raises(ValueError, match="units"):
        eta.step(units)
    with pytest.raises(ValueError, match="units"):
        eta.skip(units)
    assert eta.done == 0 and eta.total == 3


def test_reach_sets_the_count_and_never_goes_back() -> None:
    clock = FakeClock()
    eta = Eta(10, clock=clock)
    clock.t += 10
    assert eta.reach(5) == "ETA 10 s"
    assert eta.reach(3) == "ETA 10 s" and eta.done == 5
    assert eta.reach(10) == "done"
    with pytest.raises(ValueError, match="done"):
        eta.reach(math.nan)


def test_phantom_progress_lines_carry_the_sites_eta(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A line per tenth of a site; a site first seen mid-way is timed from there."""
    import logging

    from simulation.phantom.generate import _LogProgress

    cb = _LogProgress()
    with caplog.at_level(logging.INFO, logger="simulation.phantom.generate"):
        for done in range(1, 21):
            cb("A", done, 20)
        cb("B", 7, 8)
        cb("B", 8, 8)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 12
    assert lines[0].startswith("phantom site A: 2/20 images (ETA ")
    assert lines[9] == "phantom site A: 20/20 images (done)"
    # B's 7 images before its first report are not timed: no pace yet
    assert lines[10:] == [
        "phantom site B: 7/8 images (ETA ?)",
        "phantom site B: 8/8 images (done)",
    ]
