"""The exam-complete rule, with a fake clock."""

from __future__ import annotations

import pytest

from client.dicom_node.exams import ExamTracker


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_complete_after_release_and_settle() -> None:
    clock = Clock()
    tr = ExamTracker(settle_s=2.0, idle_s=60.0, clock=clock)
    tr.association_opened(1)
    for _ in range(4):
        tr.image_received("S1", 1)
    clock.t += 10.0
    assert tr.pop_complete() == []  # association still open, not idle yet
    tr.association_ended(1)
    assert tr.pop_complete() == ["S1"]  # released, last image 10 s >= 2 s ago
    tr.association_opened(2)
    tr.image_received("S2", 2)
    tr.association_ended(2)
    assert tr.pop_complete() == []  # released but not settled
    clock.t += 2.0
    assert tr.pop_complete() == ["S2"]
    assert tr.pop_complete() == [] and tr.pending() == []


def test_one_image_per_association_is_one_exam() -> None:
    clock = Clock()
    tr = ExamTracker(settle_s=2.0, idle_s=60.0, clock=clock)
    for assoc in range(4):
        tr.association_opened(assoc)
        tr.image_received("S", assoc)
        tr.association_ended(assoc)
        clock.t += 0.5
        assert tr.pop_complete() == []
    clock.t += 2.0
    assert tr.pop_complete() == ["S"]


def test_idle_completes_while_association_stays_open() -> None:
    clock = Clock()
    tr = ExamTracker(settle_s=1.0, idle_s=30.0, clock=clock)
    tr.association_opened(7)
    tr.image_received("A", 7)
    clock.t += 5.0
    tr.image_received("B", 7)
    clock.t += 25.0
    assert tr.pop_complete() == ["A"]  # 30 s idle; B only 25 s
    clock.t += 5.0
    assert tr.pop_complete() == ["B"]


def test_restored_study_completes_after_settling() -> None:
    clock = Clock()
    tr = ExamTracker(settle_s=1.0, idle_s=30.0, clock=clock)
    tr.restore("R")
    assert tr.pending() == ["R"] and tr.pop_complete() == []
    clock.t += 1.0
    assert tr.pop_complete() == ["R"]


def test_bad_timing_is_refused() -> None:
    with pytest.raises(ValueError, match="settle_s=5"):
        ExamTracker(settle_s=5.0, idle_s=1.0)
