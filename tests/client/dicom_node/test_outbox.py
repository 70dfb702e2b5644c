"""The persistent outbox: queue first, retry with backoff, survive a restart."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from client.dicom_node.outbox import ItemState, Outbox, RetryPolicy, SendError


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


class Destination:
    """A fake C-STORE peer: down or up; records what it received."""

    def __init__(self) -> None:
        self.up = False
        self.received: list[str] = []

    def __call__(self, path: Path) -> None:
        if not self.up:
            raise SendError("PACS@127.0.0.1:1: no connection (destination down)")
        self.received.append(str(pydicom.dcmread(path).SOPInstanceUID))


def _ds() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.50"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


POLICY = RetryPolicy(interval_s=10.0, backoff=2.0, max_interval_s=25.0, max_attempts=4)


def _sender_until_received(
    box: Any, dest: Any, then: Callable[[], object] = lambda: None
) -> threading.Thread:
    """Run ``box``'s sender thread, call ``then``, wait (5 s at most) until
    ``dest`` received something, stop the thread; returns it, joined."""
    stop = threading.Event()
    t = threading.Thread(target=box.run, args=(stop, 0.05))
    t.start()
    try:
        then()
        for _ in range(100):
            if dest.received:
                break
            threading.Event().wait(0.05)
    finally:
        stop.set()
        box.wake()
        t.join(timeout=10)
    return t


def test_backoff_delays() -> None:
    assert [POLICY.delay_s(n) for n in (1, 2, 3, 4)] == [10.0, 20.0, 25.0, 25.0]
    fixed = RetryPolicy(1.0, 1.0, 1.0, 3)
    assert [fixed.delay_s(n) for n in (1, 5)] == [1.0, 1.0]


def test_queued_before_sending_retried_and_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock, dest = Clock(), Destination()
    box = Outbox(tmp_path / "q", dest, POLICY, clock=clock)
    ds = _ds()
    item = box.enqueue(ds, "a", _write)
    assert item == tmp_path / "q" / "pending" / "a.dcm" and item.is_file()
    assert [p.name for p in (tmp_path / "q" / "pending").iterdir()] == ["a.dcm"]
    with caplog.at_level(logging.WARNING, logger="client.dicom_node.outbox"):
        assert box.process_due() == 0
    assert "a.dcm: attempt 1/4 failed: PACS@127.0.0.1:1: no connection" in caplog.text
    assert "next try in 10.0 s" in caplog.text
    st = box.state(item)
    assert st.attempts == 1 and st.next_attempt_at == clock.t + 10.0
    # not due yet: no attempt even with the destination up
    dest.up = True
    assert box.process_due() == 0 and dest.received == []
    clock.t += 10.0
    assert box.process_due() == 1
    assert dest.received == [ds.SOPInstanceUID]
    assert box.pending() == [] and not any((tmp_path / "q" / "pending").iterdir())


def test_restart_keeps_item_and_attempt_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock, dest = Clock(), Destination()
    box = Outbox(tmp_path / "q", dest, POLICY, clock=clock)
    box.enqueue(_ds(), "a", _write)
    box.process_due()
    clock.t += 10.0
    box.process_due()
    # "restart": a new Outbox on the same folder
    box2 = Outbox(tmp_path / "q", dest, POLICY, clock=clock)
    [item] = box2.pending()
    assert box2.state(item).attempts == 2
    clock.t += 20.0
    with caplog.at_level(logging.WARNING):
        box2.process_due()
    assert "attempt 3/4 failed" in caplog.text


def test_gives_up_after_max_attempts_into_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock, dest = Clock(), Destination()
    box = Outbox(tmp_path / "q", dest, POLICY, clock=clock)
    box.enqueue(_ds(), "a", _write)
    with caplog.at_level(logging.WARNING):
        for _ in range(POLICY.max_attempts):
            box.process_due()
            clock.t += 100.0
    assert box.pending() == []
    [failed] = box.failed()
    assert failed.name == "a.dcm"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "attempt 4/4 failed" in errors[0].getMessage()
    assert str(failed) in errors[0].getMessage()
    dest.up = True
    assert box.process_due() == 0 and dest.received == []  # not retried any more


def test_unexpected_sender_error_counts_as_failed_attempt(tmp_path: Path) -> None:
    def boom(path: Path) -> None:
        raise RuntimeError("corrupt file")

    box = Outbox(tmp_path / "q", boom, POLICY, clock=Clock())
    item = box.enqueue(_ds(), "a", _write)
    assert box.process_due() == 0
    assert "RuntimeError: corrupt file" in str(box.state(item).last_error)


def test_run_thread_delivers_and_stops(tmp_path: Path) -> None:
    dest = Destination()
    dest.up = True
    box = Outbox(tmp_path / "q", dest, RetryPolicy(0.05, 1.0, 0.05, 3))
    t = _sender_until_received(box, dest, lambda: box.enqueue(_ds(), "a", _write))
    assert not t.is_alive() and len(dest.received) == 1


def test_bad_item_name_refused(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "q", Destination(), POLICY)
    with pytest.raises(ValueError, match="'../x'"):
        box.enqueue(_ds(), "../x", _write)


def test_backoff_never_overflows() -> None:
    # max_attempts may be 100000 ("never give up"); 2.0 ** 1024 overflows
    policy = RetryPolicy(30.0, 2.0, 3600.0, 100000)
    assert policy.delay_s(1025) == policy.delay_s(99999) == 3600.0
    assert RetryPolicy(30.0, 10.0, 3600.0, 100000).delay_s(400) == 3600.0


def test_long_outage_keeps_retrying(tmp_path: Path) -> None:
    clock, dest = Clock(), Destination()
    policy = RetryPolicy(30.0, 2.0, 3600.0, 100000)
    box = Outbox(tmp_path / "q", dest, policy, clock=clock)
    item = box.enqueue(_ds(), "a", _write)
    box._write_state(item, ItemState(1500, 0.0, "down"))  # a month of outage
    assert box.process_due() == 0
    st = box.state(item)
    assert st.attempts == 1501 and st.next_attempt_at == clock.t + 3600.0


def test_retry_state_with_an_infinite_count_starts_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock, dest = Clock(), Destination()
    box = Outbox(tmp_path / "q", dest, POLICY, clock=clock)
    item = box.enqueue(_ds(), "a", _write)
    (item.parent / f"{item.name}.json").write_text(
        '{"attempts": 1e999, "next_attempt_at": 0, "last_error": null}'
    )
    with caplog.at_level(logging.WARNING):
        assert box.state(item) == ItemState()
    assert "unreadable retry state" in caplog.text
    dest.up = True
    assert box.process_due() == 1


def test_sender_thread_survives_an_unexpected_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dest = Destination()
    dest.up = True
    box = Outbox(tmp_path / "q", dest, RetryPolicy(0.05, 1.0, 0.05, 3))
    real = box.process_due
    calls: list[int] = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in one pass")
        return real()

    box.process_due = flaky  # type: ignore[method-assign]
    box.enqueue(_ds(), "a", _write)
    with caplog.at_level(logging.ERROR):
        _sender_until_received(box, dest)
    assert len(dest.received) == 1
    assert "unexpected error; sending goes on" in caplog.text
