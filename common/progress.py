"""Estimated time to completion for the log lines of long work.

Training epochs, federated rounds and a study's regimes log one line each as
they finish; :class:`Eta` adds how long the rest should take, from the pace so
far. Work whose parts differ in cost (a study's regimes) gives each part a
weight: the estimate is ``elapsed / done weight * remaining weight``.

    eta = Eta(total=12)
    for epoch in range(12):
        ...
        log.info("epoch %d/12 ... %s", epoch + 1, eta.step())
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["Eta", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``"45 s"``, ``"3 min 20 s"``, ``"1 h 05 min"``; ``"?"`` when not finite."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Eta:
    """Time left of work of ``total`` units, from the pace of the units done.

    Args:
        total: the work's units (epochs, rounds, or a sum of weights); must
            be > 0 and finite.
        clock: seconds since an arbitrary origin (tests pass a fake one).
    """

    def __init__(
        self, total: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (math.isfinite(total) and total > 0):
            raise ValueError(f"total: must be a finite number > 0, got {total!r}")
        self.total = float(total)
        self.done = 0.0
        self._clock = clock
        self._t0 = clock()

    @property
    def elapsed(self) -> float:
        """Seconds since the work started."""
        return self._clock() - self._t0

    def remaining(self) -> float:
        """Seconds left at the pace so far; ``nan`` before any unit is done."""
        if self.done <= 0:
            return math.nan
        return self.elapsed / self.done * max(0.0, self.total - self.done)

    def step(self, units: float = 1.0) -> str:
        """Count ``units`` more as done; returns :meth:`text`."""
        if not (math.isfinite(units) and units >= 0):
            raise ValueError(f"units: must be a finite number >= 0, got {units!r}")
        self.done = min(self.total, self.done + units)
        return self.text()

    def reach(self, done: float) -> str:
        """Count ``done`` units in all (never backwards); returns :meth:`text`."""
        if not math.isfinite(done):
            raise ValueError(f"done: must be a finite number, got {done!r}")
        return self.step(max(0.0, done - self.done))

    def skip(self, units: float) -> None:
        """Take ``units`` out of the work (done by an earlier, resumed run).

        They leave the total without counting as done, so they do not make
        the pace look faster.
        """
        if not (math.isfinite(units) and units >= 0):
            raise ValueError(f"units: must be a finite number >= 0, got {units!r}")
        self.total = max(self.done, self.total - units)

    def text(self) -> str:
        """``"ETA 3 min 20 s"``, ``"ETA ?"`` before any unit, ``"done"`` at the end."""
        if self.done >= self.total:
            return "done"
        return f"ETA {format_seconds(self.remaining())}"
