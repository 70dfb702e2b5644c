"""When is an exam complete? Received images grouped by study, with a clock.

Rule (documented in ``docs/dicom.md``, "DICOM node"): a study is **complete**

* when no association that delivered images of it is still open and no image
  of it arrived for ``settle_s`` seconds (the usual case: the modality sends
  the exam and releases; ``settle_s`` covers senders that open one
  association per image), or
* when no image of it arrived for ``idle_s`` seconds, even if such an
  association stays open (senders that keep associations open).

An image of a study that arrives after the study was handed out starts the
study again; its next completion covers every image of the study received so
far (see :class:`client.dicom_node.node.DicomNode`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Study:
    last_image_at: float
    images: int = 0
    open_associations: set[int] = field(default_factory=set)


class ExamTracker:
    """Thread-safe bookkeeping of studies being received.

    Args:
        settle_s: quiet time after the last association of a study ended.
        idle_s: quiet time after which a study is complete regardless.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        settle_s: float,
        idle_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settle_s < 0 or idle_s < settle_s:
            raise ValueError(
                f"need 0 <= settle_s <= idle_s, got settle_s={settle_s}, "
                f"idle_s={idle_s}"
            )
        self.settle_s = float(settle_s)
        self.idle_s = float(idle_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._studies: dict[str, _Study] = {}
        self._open: set[int] = set()

    def image_received(self, study_uid: str, association_id: int) -> None:
        """Record one image of ``study_uid`` delivered on ``association_id``."""
        now = self._clock()
        with self._lock:
            st = self._studies.setdefault(study_uid, _Study(now))
            st.last_image_at = now
            st.images += 1
            if association_id in self._open:
                st.open_associations.add(association_id)

    def association_opened(self, association_id: int) -> None:
        """An association was accepted (its images count as in flight)."""
        with self._lock:
            self._open.add(association_id)

    def association_ended(self, association_id: int) -> None:
        """An association was released, aborted or its connection closed."""
        with self._lock:
            self._open.discard(association_id)
            for st in self._studies.values():
                st.open_associations.discard(association_id)

    def restore(self, study_uid: str) -> None:
        """A study found on disk at start (not yet scored): complete after settling."""
        with self._lock:
            self._studies.setdefault(study_uid, _Study(self._clock()))

    def pending(self) -> list[str]:
        """Studies received but not yet complete (sorted)."""
        with self._lock:
            return sorted(self._studies)

    def pop_complete(self) -> list[str]:
        """Remove and return the studies complete now (sorted by last image time)."""
        now = self._clock()
        with self._lock:
            done = [
                (st.last_image_at, uid)
                for uid, st in self._studies.items()
                if now - st.last_image_at >= self.idle_s
                or (
                    not st.open_associations and now - st.last_image_at >= self.settle_s
                )
            ]
            for _, uid in done:
                del self._studies[uid]
        return [uid for _, uid in sorted(done)]
