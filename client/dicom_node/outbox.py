"""Persistent outbox: a result is on disk before it is sent, and until it arrives.

Layout of ``queue_dir``::

    pending/<name>.dcm          results waiting to be sent (oldest name first)
    pending/<name>.dcm.json     {"attempts", "next_attempt_at" (Unix s),
                                 "last_error"}; absent before the first attempt
    failed/<name>.dcm (+ .json) results given up after ``max_attempts``

:meth:`Outbox.enqueue` writes through a hidden temporary file, fsyncs and
renames, so a crash leaves either nothing or a complete file. The sender
(:meth:`Outbox.run`) re-reads ``pending/`` on every pass, so a daemon restart
simply continues: attempt counts and due times are in the ``.json`` files.
Each failed attempt is logged with its reason and the next due time
(``retry_interval_s * retry_backoff ** (attempts - 1)``, at most
``retry_max_interval_s``); a delivered result is deleted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from common.config.dicom_node import DicomDestination, DicomNodeConfig
from common.errors import MammofedError
from common.fileio import atomic_write_text

log = logging.getLogger(__name__)

PENDING_DIR = "pending"
FAILED_DIR = "failed"
STATE_SUFFIX = ".json"
#: Statuses of a C-STORE-RSP that mean "stored" (success and the B0xx warnings).
DELIVERED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class SendError(MammofedError):
    """One send attempt failed; the message says why (connection, status...)."""


#: ``send(path)`` delivers one file or raises :class:`SendError`.
Sender = Callable[[Path], None]


def c_store_file(
    path: Path, destination: DicomDestination, calling_ae: str, timeout_s: float
) -> None:
    """Send one DICOM file by C-STORE to ``destination``.

    Raises:
        SendError: no connection, association rejected or aborted, no
            response, or a failure status (the message quotes it).
    """
    import pydicom
    from pynetdicom import AE, evt

    ds = pydicom.dcmread(path)
    connected: list[bool] = []
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(True))],
    )
    if not assoc.is_established:
        if not connected:
            why = "no connection (destination down or unreachable)"
        elif assoc.is_rejected:
            why = "association rejected"
        else:
            why = "association aborted or timed out"
        raise SendError(f"{where}: {why}")
    try:
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        raise SendError(f"{where}: no C-STORE response (timeout or abort)")
    if int(code) not in DELIVERED_STATUSES:
        raise SendError(f"{where}: C-STORE failed with status 0x{int(code):04X}")


@dataclass(frozen=True)
class ItemState:
    """Retry state of one queued file (its ``.json`` companion).

    Attributes:
        attempts: sends tried so far.
        next_attempt_at: Unix seconds before which it is not tried again.
        last_error: why the last attempt failed.
    """

    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again.

    Attributes:
        interval_s: wait before the first retry.
        backoff: multiplier of each further wait (1: fixed interval).
        max_interval_s: longest wait.
        max_attempts: attempts before giving up (file moved to ``failed/``).
    """

    interval_s: float
    backoff: float
    max_interval_s: float
    max_attempts: int

    @classmethod
    def from_config(cls, cfg: DicomNodeConfig) -> RetryPolicy:
        """The policy of a node config."""
        return cls(
            cfg.retry_interval_s,
            cfg.retry_backoff,
            cfg.retry_max_interval_s,
            cfg.max_attempts,
        )

    def delay_s(self, attempts: int) -> float:
        """Wait after ``attempts`` failed attempts (``max_interval_s`` at most).

        Never overflows: ``2.0 ** 1024`` does, and ``max_attempts`` may be 100000.
        """
        try:
            d = self.interval_s * self.backoff ** max(attempts - 1, 0)
        except OverflowError:
            return float(self.max_interval_s)
        return float(min(d, self.max_interval_s))


class Outbox:
    """A folder-backed queue of DICOM files to deliver (layout: module docstring).

    Args:
        queue_dir: the queue folder (created by the first :meth:`enqueue`).
        send: delivers one file or raises :class:`SendError`.
        policy: retry timing and attempt limit.
        clock: wall-clock seconds (persisted due times; injectable for tests).
    """

    def __init__(
        self,
        queue_dir: str | Path,
        send: Sender,
        policy: RetryPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(queue_dir)
        self.pending_dir = self.root / PENDING_DIR
        self.failed_dir = self.root / FAILED_DIR
        self.send = send
        self.policy = policy
        self._clock = clock
        self._wake = threading.Event()

    # --- queue contents -----------------------------------------------------
    def pending(self) -> list[Path]:
        """Files waiting, oldest name first (hidden temporaries excluded)."""
        return sorted(
            p for p in self.pending_dir.glob("*.dcm") if not p.name.startswith(".")
        )

    def failed(self) -> list[Path]:
        """Files given up on."""
        return sorted(self.failed_dir.glob("*.dcm"))

    @staticmethod
    def _state_path(item: Path) -> Path:
        return item.with_name(item.name + STATE_SUFFIX)

    def state(self, item: Path) -> ItemState:
        """An item's retry state (fresh when it has none or it is unreadable)."""
        sp = self._state_path(item)
        if not sp.is_file():
            return ItemState()
        try:
            data = json.loads(sp.read_text())
            return ItemState(
                int(data["attempts"]),
                float(data["next_attempt_at"]),
                None if data.get("last_error") is None else str(data["last_error"]),
            )
        except (OSError, ValueError, KeyError, TypeError, OverflowError) as exc:
            log.warning("%s: unreadable retry state (%s); starting over", sp, exc)
            return ItemState()

    def _write_state(self, item: Path, st: ItemState) -> None:
        atomic_write_text(self._state_path(item), json.dumps(asdict(st)))

    # --- enqueue --------------------------------------------------------------
    def enqueue(
        self, ds: Dataset, name: str, write: Callable[[Dataset, Path], Path]
    ) -> Path:
        """Persist ``ds`` as ``pending/<name>.dcm`` with ``write`` and wake the sender.

        ``write(ds, path)`` writes a DICOM file (e.g. ``client.cad_sr.write_cad_sr``).
        """
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"queue item name must be a plain file name, got {name!r}")
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        final = self.pending_dir / f"{name}.dcm"
        tmp = self.pending_dir / f".{name}.{os.getpid()}.tmp.dcm"
        try:
            written = Path(write(ds, tmp))
            with open(written, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(written, final)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.pending_dir)
        log.info("queued %s", final)
        self._wake.set()
        return final

    # --- sending ----------------------------------------------------------------
    def process_due(self) -> int:
        """Try every due item once; return how many were delivered."""
        delivered = 0
        for item in self.pending():
            st = self.state(item)
            if st.next_attempt_at > self._clock():
                continue
            attempts = st.attempts + 1
            try:
                self.send(item)
            except SendError as exc:
                self._failed_attempt(item, attempts, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - an odd file must not stop the queue
                self._failed_attempt(
                    item, attempts, f"unexpected {type(exc).__name__}: {exc}"
                )
                continue
            log.info("delivered %s (attempt %d)", item.name, attempts)
            self._state_path(item).unlink(missing_ok=True)
            item.unlink(missing_ok=True)
            delivered += 1
        return delivered

    def _failed_attempt(self, item: Path, attempts: int, error: str) -> None:
        limit = self.policy.max_attempts
        if attempts >= limit:
            self.failed_dir.mkdir(parents=True, exist_ok=True)
            dest = self.failed_dir / item.name
            self._write_state(item, ItemState(attempts, 0.0, error))
            os.replace(item, dest)
            os.replace(self._state_path(item), self._state_path(dest))
            log.error(
                "%s: attempt %d/%d failed: %s; giving up, moved to %s",
                item.name, attempts, limit, error, dest,
            )  # fmt: skip
            return
        delay = self.policy.delay_s(attempts)
        self._write_state(item, ItemState(attempts, self._clock() + delay, error))
        log.warning(
            "%s: attempt %d/%d failed: %s; next try in %.1f s",
            item.name, attempts, limit, error, delay,
        )  # fmt: skip

    def next_due_in(self) -> float | None:
        """Seconds until the next item is due (0 if one is due); ``None``: empty."""
        items = self.pending()
        if not items:
            return None
        now = self._clock()
        return max(0.0, min(self.state(p).next_attempt_at for p in items) - now)

    def run(self, stop: threading.Event, poll_s: float = 1.0) -> None:
        """Send until ``stop`` is set (thread target); re-reads the queue each pass."""
        if self.pending():
            log.info("outbox %s: %d results pending", self.root, len(self.pending()))
        while not stop.is_set():
            try:
                self.process_due()
                due = self.next_due_in()
            except OSError as exc:
                log.error("outbox %s: %s", self.root, exc)
                due = None
            except Exception:  # noqa: BLE001 - the sender must outlive one bad pass
                log.exception("outbox %s: unexpected error; sending goes on", self.root)
                due = None
            wait = poll_s if due is None else min(max(due, 0.05), poll_s)
            self._wake.wait(wait)
            self._wake.clear()

    def wake(self) -> None:
        """Make the sender look at the queue now."""
        self._wake.set()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
