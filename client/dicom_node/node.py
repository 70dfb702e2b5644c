"""The site's DICOM storage node: images in, CAD SR (and presentation states) out.

:class:`DicomNode` runs three things until stopped:

* a **Storage SCP** (pynetdicom) on ``dicom_node.host:port`` with AE title
  ``dicom_node.ae_title``. Associations from a calling AE title not in
  ``allowed_calling_aes`` are rejected (A-ASSOCIATE-RJ, rejected-permanent,
  service-user, "calling AE title not recognized") and logged with the title and
  the peer address; associations addressed to another called AE title are
  rejected the same way ("called AE title not recognized"). Every storage SOP
  class is negotiated (any transfer syntax but deflated, which pynetdicom
  would inflate without a bound), so a wrong object gets a C-STORE
  failure status rather than a failed negotiation: see
  :mod:`client.dicom_node.checks`. Accepted images go to
  ``<incoming_dir>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``. C-ECHO answers.
* an **exam worker**: when a study is complete (rule in
  :mod:`client.dicom_node.exams`) it scores every image of the study received
  so far with the site's current model (:class:`~client.dicom_node.scoring.ExamScorer`),
  builds one Mammography CAD SR (:func:`client.cad_sr.build_cad_sr`) and, with
  ``dicom_node.presentation_states``, one Grayscale Softcopy Presentation State
  per scored image (:func:`client.gsps.build_exam_gsps`: marks any PACS viewer
  draws), puts them in the outbox (each once: the same exam and model give the
  same UIDs), then ingests the site folder
  (:func:`client.ingest.ingest_site`): the received images become cache entries
  without annotation rows, i.e. **unlabeled** images that the semi-supervised
  trainer uses. ``<study>/.scored.json`` records what was scored; studies with
  unscored images found at start (daemon stopped mid-exam) are processed again.
* the **outbox sender** (:class:`~client.dicom_node.outbox.Outbox`): C-STORE of
  each SR (and presentation state) to ``dicom_node.destination``, retried
  with backoff across restarts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from client.cad_sr import build_cad_sr, write_cad_sr
from client.dicom_node.checks import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    check_received,
)
from client.dicom_node.exams import ExamTracker
from client.dicom_node.outbox import Outbox, RetryPolicy, c_store_file
from client.dicom_node.scoring import ExamScorer
from client.export import checkpoint_paths
from client.gsps import build_exam_gsps, write_gsps
from common import __version__
from common.config.dicom_node import DicomNodeConfig
from common.config.site import SiteConfig
from common.errors import ConfigError, MammofedError, shown
from common.fileio import atomic_write, atomic_write_text
from common.imaging.dicom import DEFER_SIZE, dcmread_bounded, header_text

log = logging.getLogger(__name__)

#: First byte of a P-DATA-TF PDU (PS3.8 9.3.5), which carries DIMSE messages.
_P_DATA_TF = b"\x04"

#: Per-study record of what was scored and which SR was made.
SCORED_JSON = ".scored.json"
#: Folder under ``data_dir`` holding received images when not configured.
DEFAULT_INCOMING = "incoming"
#: ``algorithm_name`` written into the SR.
ALGORITHM_NAME = "mammofed"


def _peer(assoc: Any) -> str:
    req = assoc.requestor
    return f"{req.address}:{req.port}"


def _why(exc: BaseException) -> str:
    """An error about a sender's data, its text bounded (it may quote the bytes)."""
    return f"{type(exc).__name__}: {shown(str(exc), 300)}"


class DicomNode:
    """Storage SCP + exam worker + outbox sender (see the module docstring).

    Args:
        site: the site config; needs ``data_dir``, ``cache_dir`` and ``dicom_node``.
        checkpoint: model file, or several whose findings are fused; replaces
            ``dicom_node.checkpoint`` and ``dicom_node.fuse_with``.
        device: torch device for scoring (``auto``, ``cpu``, ``cuda``...).
        source: where ``site`` came from, for error messages (file name).
        poll_s: how often the worker looks for complete exams.

    Raises:
        ConfigError: a setting the node needs is missing or inconsistent
            (names the file, the key and the value).
    """

    def __init__(
        self,
        site: SiteConfig,
        *,
        checkpoint: str | Path | Sequence[str | Path] | None = None,
        device: str = "auto",
        source: str = "<site config>",
        poll_s: float = 0.2,
    ) -> None:
        node = site.dicom_node
        if node is None:
            raise ConfigError(source, "dicom_node", "missing: the node is not set up")
        # received files get the permissions a plain write would (0666 less the
        # umask), as before they went through a temporary file; read here,
        # before the node's threads start (os.umask sets it to read it)
        mask = os.umask(0o022)
        os.umask(mask)
        self.file_mode = 0o666 & ~mask
        if site.data_dir is None:
            raise ConfigError(
                source, "data_dir", "required by dicom_node (images are stored there)"
            )
        if site.cache_dir is None:
            raise ConfigError(
                source, "cache_dir", "required by dicom_node (images are ingested)"
            )
        if checkpoint is not None:
            models = checkpoint_paths(checkpoint)
        elif node.checkpoint is not None:
            models = [node.checkpoint, *node.fuse_with]
        elif node.fuse_with:
            raise ConfigError(
                source,
                "dicom_node.checkpoint",
                "missing while fuse_with is set: name the site's main model",
            )
        else:
            models = []
        if not models:
            raise ConfigError(
                source,
                "dicom_node.checkpoint",
                "no model: set it or pass --checkpoint",
            )
        incoming = node.incoming_dir or site.data_dir / DEFAULT_INCOMING
        if not incoming.resolve().is_relative_to(site.data_dir.resolve()):
            raise ConfigError(
                source,
                "dicom_node.incoming_dir",
                f"must lie inside data_dir ({site.data_dir}) so that ingest keeps "
                f"its images, got {str(incoming)!r}",
            )
        if incoming.resolve().is_relative_to(site.cache_dir.resolve()):
            raise ConfigError(
                source,
                "dicom_node.incoming_dir",
                f"must not lie inside cache_dir ({site.cache_dir}), "
                f"got {str(incoming)!r}",
            )
        self.site = site
        self.cfg: DicomNodeConfig = node
        self.incoming = Path(incoming)
        self.poll_s = float(poll_s)
        self.tracker = ExamTracker(node.exam_settle_s, node.exam_idle_s)
        # P-DATA bytes per association since its last stored instance (_on_data)
        self._recv_lock = threading.Lock()
        self._recv_bytes: dict[int, int] = {}
        self.scorer = ExamScorer(
            models,
            score_floor=node.score_floor,
            default_spacing_mm=site.default_spacing_mm,
            max_pixels=site.max_pixels,
            device=device,
        )
        self.outbox = Outbox(
            node.queue_dir,
            lambda p: c_store_file(p, node.destination, node.ae_title, node.timeout_s),
            RetryPolicy.from_config(node),
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None

    # --- lifecycle --------------------------------------------------------------
    @property
    def port(self) -> int:
        """The port the SCP listens on (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("the node is not started")
        return int(self._server.server_address[1])

    def start(self) -> DicomNode:
        """Load the model, open the port, start the worker and sender threads.

        Raises:
            MammofedError: the model cannot be loaded or the port not opened.
        """
        from pydicom.uid import DeflatedExplicitVRLittleEndian
        from pynetdicom import (
            AE,
            ALL_TRANSFER_SYNTAXES,
            AllStoragePresentationContexts,
            evt,
        )
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        self.scorer.load()
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._restore_unscored()
        ae = AE(ae_title=self.cfg.ae_title)
        ae.require_calling_aet = list(self.cfg.allowed_calling_aes)
        ae.require_called_aet = True
        ae.acse_timeout = ae.dimse_timeout = self.cfg.timeout_s
        # not deflated: pynetdicom inflates a C-STORE's data set whole, without
        # a limit, so a few kB could say gigabytes (senders fall back to an
        # uncompressed syntax, which every storage SCU proposes as well)
        syntaxes = [
            ts for ts in ALL_TRANSFER_SYNTAXES if ts != DeflatedExplicitVRLittleEndian
        ]
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        self._stop.clear()
        for name, target in (
            ("dicom-outbox", lambda: self.outbox.run(self._stop)),
            ("dicom-exams", self._work),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        try:
            self._server = ae.start_server(
                (self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers
            )
        except OSError as exc:
            self.stop()
            raise MammofedError(
                f"cannot listen on {self.cfg.host}:{self.cfg.port}: {exc}"
            ) from exc
        log.info(
            "DICOM node %s listening on %s:%d; allowed calling AEs: %s; "
            "results to %s@%s:%d; incoming %s",
            self.cfg.ae_title, self.cfg.host, self.port,
            ", ".join(self.cfg.allowed_calling_aes), self.cfg.destination.ae_title,
            self.cfg.destination.host, self.cfg.destination.port, self.incoming,
        )  # fmt: skip
        return self

    def stop(self) -> None:
        """Close the port, stop the threads (pending SRs stay queued on disk)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        self.outbox.wake()
        for t in self._threads:
            t.join(timeout=60)
        self._threads.clear()
        pending = self.tracker.pending()
        if pending:
            log.info(
                "%d exams still incomplete; they are scored at the next start",
                len(pending),
            )

    def __enter__(self) -> DicomNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Run until interrupted (KeyboardInterrupt / SIGTERM); then stop."""
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    # --- SCP event handlers (run in pynetdicom's association threads) ------------
    def _on_accepted(self, event: Any) -> None:
        self.tracker.association_opened(id(event.assoc))
        log.info(
            "association from %s at %s accepted",
            event.assoc.requestor.ae_title, _peer(event.assoc),
        )  # fmt: skip

    def _on_closed(self, event: Any) -> None:
        self.tracker.association_ended(id(event.assoc))
        with self._recv_lock:
            self._recv_bytes.pop(id(event.assoc), None)

    def _on_data(self, event: Any) -> None:
        """Count what an association sends towards its current instance.

        pynetdicom assembles a C-STORE's data set in memory, whole, before
        :meth:`_on_store` sees it, so a sender could exhaust the node's memory
        with one huge instance. P-DATA bytes since the association's last
        stored instance (:meth:`_on_store` resets the count) over
        ``dicom_node.max_instance_mb`` abort the association; nothing of that
        instance is kept. Runs in pynetdicom's reactor thread: it only counts
        and queues the abort.
        """
        data = event.data
        if data[:1] != _P_DATA_TF:
            return
        key = id(event.assoc)
        with self._recv_lock:
            total = self._recv_bytes.get(key, 0) + len(data)
            self._recv_bytes[key] = total
        cap = self.cfg.max_instance_mb * 2**20
        if total > cap and not event.assoc.is_aborted:
            log.error(
                "aborted the association from %s at %s: over %.0f MiB sent towards "
                "one instance, above dicom_node.max_instance_mb = %g",
                event.assoc.requestor.ae_title, _peer(event.assoc),
                total / 2**20, self.cfg.max_instance_mb,
            )  # fmt: skip
            event.assoc.abort(block=False)

    def _on_rejected(self, event: Any) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        rq = assoc.requestor.primitive
        called = str(rq.called_ae_title).strip() if rq is not None else ""
        if calling not in self.cfg.allowed_calling_aes:
            why = (
                "calling AE title not recognized (allowed: "
                f"{', '.join(self.cfg.allowed_calling_aes)})"
            )
        elif called and called != self.cfg.ae_title:
            why = f"called AE title {called!r} is not this node's {self.cfg.ae_title!r}"
        else:
            why = "local limit (too many associations)"
        log.warning(
            "association from calling AE %r at %s rejected: %s",
            calling, _peer(assoc), why,
        )  # fmt: skip

    def _on_store(self, event: Any) -> int:
        assoc = event.assoc
        with self._recv_lock:  # the next instance is counted from here
            self._recv_bytes[id(assoc)] = 0
        who = f"{str(assoc.requestor.ae_title).strip()} at {_peer(assoc)}"
        try:
            ds: Dataset = event.dataset
            ds.file_meta = event.file_meta
        except Exception as exc:  # noqa: BLE001 - any decode failure is the sender's
            log.warning(
                "refused an instance from %s: data set cannot be decoded: %s "
                "(status 0x%04X)", who, _why(exc), STATUS_CANNOT_UNDERSTAND,
            )  # fmt: skip
            return STATUS_CANNOT_UNDERSTAND
        try:
            sop_uid = header_text(ds, "SOPInstanceUID") or "absent"
            refusal = check_received(ds, event.request.AffectedSOPClassUID)
        except Exception as exc:  # noqa: BLE001 - a header pydicom cannot convert
            log.warning(
                "refused an instance from %s: header cannot be read: %s "
                "(status 0x%04X)", who, _why(exc), STATUS_CANNOT_UNDERSTAND,
            )  # fmt: skip
            return STATUS_CANNOT_UNDERSTAND
        if refusal is not None:
            log.warning("%s; from %s", refusal.message(sop_uid), who)
            return refusal.status
        study = header_text(ds, "StudyInstanceUID")
        folder = self.incoming / study
        path = folder / f"{sop_uid}.dcm"
        try:
            free_mb = shutil.disk_usage(self.incoming).free / 2**20
            if free_mb < self.cfg.min_free_mb:
                log.error(
                    "refused SOP Instance %s (study %s) from %s: %.0f MiB free on "
                    "the disk of %s, below dicom_node.min_free_mb = %g "
                    "(status 0x%04X)",
                    sop_uid, study, who, free_mb, self.incoming,
                    self.cfg.min_free_mb, STATUS_OUT_OF_RESOURCES,
                )  # fmt: skip
                return STATUS_OUT_OF_RESOURCES
            # through a hidden temporary file, removed if the write fails, and
            # flushed to disk before the sender is told it is stored
            atomic_write(
                path,
                lambda fh: ds.save_as(fh, enforce_file_format=True),
                mode=self.file_mode,
            )
        except OSError as exc:
            log.error(
                "could not store SOP Instance %s from %s in %s: %s (status 0x%04X)",
                sop_uid, who, path, exc, STATUS_OUT_OF_RESOURCES,
            )  # fmt: skip
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # noqa: BLE001 - a data set pydicom cannot write
            # e.g. a compressed transfer syntax over native pixel data, or file
            # meta elements inside the data set: the sender's fault
            log.warning(
                "refused SOP Instance %s (study %s) from %s: it cannot be written "
                "as a DICOM file: %s (status 0x%04X)",
                sop_uid, study, who, _why(exc), STATUS_CANNOT_UNDERSTAND,
            )  # fmt: skip
            return STATUS_CANNOT_UNDERSTAND
        self.tracker.image_received(study, id(assoc))
        log.info("stored %s (study %s) from %s", path.name, study, who)
        return STATUS_SUCCESS

    # --- exam worker ---------------------------------------------------------------
    def _restore_unscored(self) -> None:
        for folder in sorted(p for p in self.incoming.iterdir() if p.is_dir()):
            if folder.name.startswith("."):
                continue
            done = set(_read_scored(folder).get("files", []))
            if any(f.name not in done for f in folder.glob("*.dcm")):
                log.info("study %s has unscored images; scoring it", folder.name)
                self.tracker.restore(folder.name)

    def _work(self) -> None:
        while not self._stop.wait(self.poll_s):
            studies = self.tracker.pop_complete()
            if not studies:
                continue
            for study in studies:
                try:
                    self.process_study(study)
                except MammofedError as exc:
                    log.error("study %s not scored: %s", study, exc)
                except Exception:  # noqa: BLE001 - the daemon must keep serving
                    log.exception("study %s not scored: unexpected error", study)
            self.ingest()

    def process_study(self, study_uid: str) -> Path | None:
        """Score a study's received images, queue its CAD SR; return the SR's path.

        Returns ``None`` when no image of the study could be scored (logged).

        Raises:
            MammofedError: the model cannot be loaded.
        """
        folder = self.incoming / study_uid
        files = sorted(folder.glob("*.dcm"))
        if not files:
            log.warning("study %s: no images in %s", study_uid, folder)
            return None
        res = self.scorer.score(files)
        record: dict[str, Any] = {
            "files": [f.name for f in files],
            "refused": {p.name: why for p, why in res.refused},
            "model_sha256": self.scorer.model_sha256,
            "models": self.scorer.members(),
            "sr": None,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if not res.scored:
            log.error(
                "study %s: none of its %d images could be scored; no SR",
                study_uid, len(files),
            )  # fmt: skip
            _write_scored(folder, record)
            return None
        # headers only, large values left in the file (the SR copies small ones)
        sources = [
            dcmread_bounded(s.path, stop_before_pixels=True, defer_size=DEFER_SIZE)
            for s in res.scored
        ]
        seed = [
            study_uid,
            self.scorer.model_sha256,
            *sorted(str(src.SOPInstanceUID) for src in sources),
        ]
        detections = [s.detections for s in res.scored]
        settings: dict[str, Any] = {
            "algorithm_name": ALGORITHM_NAME,
            "algorithm_version": f"{__version__} {self.scorer.model_label()}",
            "score_floor": self.cfg.score_floor,
            # the same exam and model give the same UIDs: scored again after a
            # crash between the queue and the record below, an SR is a
            # duplicate the archive recognizes, not a second report
            "uid_seed": seed,
        }
        sr = build_cad_sr(sources, detections, **settings)
        queued = self._enqueue_once(study_uid, sr, "SR", write_cad_sr)
        record["sr"] = str(sr.SOPInstanceUID)
        if self.cfg.presentation_states:
            states = build_exam_gsps(sources, detections, **settings)
            for ps in states:
                self._enqueue_once(study_uid, ps, "presentation state", write_gsps)
            record["presentation_states"] = [str(ps.SOPInstanceUID) for ps in states]
        _write_scored(folder, record)
        log.info(
            "study %s: %d images scored (%d detections >= %.2f), %d refused; SR %s",
            study_uid, len(res.scored),
            sum(len(s.detections) for s in res.scored), self.cfg.score_floor,
            len(res.refused), queued.name,
        )  # fmt: skip
        return queued

    def _enqueue_once(
        self,
        study_uid: str,
        ds: Dataset,
        what: str,
        writer: Callable[[Dataset, Path], Path],
    ) -> Path:
        """Queue ``ds`` unless an object with its SOP Instance UID is pending."""
        uid = str(ds.SOPInstanceUID)
        already = [p for p in self.outbox.pending() if p.stem.endswith(f"-{uid}")]
        if already:  # scored again after a crash: the same object, queued once
            log.info(
                "study %s: its %s %s is already queued",
                study_uid, what, already[0].name,
            )  # fmt: skip
            return already[0]
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uid}"
        return self.outbox.enqueue(ds, name, writer)

    def ingest(self) -> None:
        """Ingest the site folder so received images join the cache (unlabeled)."""
        from client.ingest import ingest_site

        assert self.site.data_dir is not None and self.site.cache_dir is not None
        try:
            res = ingest_site(
                self.site.data_dir, self.site.cache_dir, self.site, workers=1
            )
        except MammofedError as exc:
            log.error("ingest of %s failed: %s", self.site.data_dir, exc)
            return
        log.log(
            logging.WARNING if res.removed else logging.INFO,
            "site cache %s: %d images (%d new, %d removed: their files left %s)",
            self.site.cache_dir, len(res.entries), len(res.new), len(res.removed),
            self.site.data_dir,
        )  # fmt: skip


def _read_scored(folder: Path) -> dict[str, Any]:
    path = folder / SCORED_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s unreadable (%s); study rescored", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _write_scored(folder: Path, record: dict[str, Any]) -> None:
    atomic_write_text(folder / SCORED_JSON, json.dumps(record, indent=1))
