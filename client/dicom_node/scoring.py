"""A model loaded once, scoring files on demand; reloaded when its file changes.

:class:`ExamScorer` is the "site's current model" of the storage node: the
checkpoint is read at the first exam and again whenever its size or
modification time changes (a new ``mammofed-client export`` replaces it), so
the daemon never needs a restart for a new model. It scores as
``mammofed-client predict`` does: :func:`client.export.load_detector` (safe
loading, the checkpoint's intensity standardizer) and
:func:`client.predict.detect_files`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client.export import load_detector
from client.predict import detect_files, torch_detect
from common.detector.engine import resolve_device
from common.errors import MammofedError, RefusedImage
from common.fileio import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredImage:
    """Detections of one file.

    Attributes:
        path: the scored file.
        sop_instance_uid: its SOP Instance UID (``None`` for research images).
        detections: ``[{"label", "score", "box": [xmin, ymin, xmax, ymax]}]``
            with boxes in the FILE's stored pixel grid (pixel edges, origin
            top-left, before any flip), sorted by decreasing score, as
            :func:`client.predict.detections_to_stored` returns them.
    """

    path: Path
    sop_instance_uid: str | None
    detections: list[dict[str, Any]]


@dataclass(frozen=True)
class ScoreResult:
    """What :meth:`ExamScorer.score` did: scored images and refused files."""

    scored: list[ScoredImage]
    refused: list[tuple[Path, str]]


class ExamScorer:
    """Score image files with a checkpoint (thread-safe; one exam at a time).

    Args:
        checkpoint: the model file.
        score_floor: detections below it are dropped (also the model's own
            score threshold).
        default_spacing_mm: stored spacing for DICOM files without one (the
            site config's); ``None`` refuses them.
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: images per forward pass (4: a four-view exam at once).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        score_floor: float,
        default_spacing_mm: float | None = None,
        device: str = "auto",
        batch_size: int = 4,
    ) -> None:
        if not 0.0 <= score_floor <= 1.0:
            raise ValueError(f"score_floor must be in [0, 1], got {score_floor!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.checkpoint = Path(checkpoint)
        self.score_floor = float(score_floor)
        self.default_spacing_mm = default_spacing_mm
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self._lock = threading.Lock()
        self._signature: tuple[int, int] | None = None
        self._model: torch.nn.Module | None = None
        self._std: Any = None
        self._working = 0.0
        self.model_sha256 = ""

    def load(self) -> None:
        """Load the model now (fail fast at start rather than at the first exam).

        Raises:
            MammofedError: the checkpoint cannot be read or does not fit.
        """
        with self._lock:
            self._ensure_model()

    def _ensure_model(self) -> torch.nn.Module:
        """Load the checkpoint if not loaded yet or if its file changed."""
        try:
            st = self.checkpoint.stat()
        except OSError as exc:
            raise MammofedError(
                f"{self.checkpoint}: model checkpoint unreadable: {exc}"
            ) from exc
        sig = (st.st_size, st.st_mtime_ns)
        if self._model is not None and sig == self._signature:
            return self._model
        model, ck, self._std = load_detector(
            self.checkpoint, self.device, score_floor=self.score_floor
        )
        self._working = float(ck.model_config.working_spacing_mm)
        self.model_sha256 = sha256_file(self.checkpoint)
        self._model, self._signature = model, sig
        log.info(
            "model %s loaded (sha256 %s, %s, working spacing %.3g mm)",
            self.checkpoint, self.model_sha256[:12], ck.model_config.arch,
            self._working,
        )  # fmt: skip
        return model

    def score(self, paths: Sequence[str | Path]) -> ScoreResult:
        """Detections for every readable file; unreadable ones listed with a reason.

        Raises:
            MammofedError: the checkpoint cannot be read or does not fit.
        """
        with self._lock:
            model = self._ensure_model()
            refused: list[tuple[Path, str]] = []

            def refuse(p: Path, exc: Exception) -> None:
                reason = exc.reason if isinstance(exc, RefusedImage) else str(exc)
                log.warning("not scored: %s: %s", p, reason)
                refused.append((p, reason))

            scored = [
                ScoredImage(p, image.meta.sop_instance_uid, detections)
                for p, image, detections in detect_files(
                    torch_detect(model, self.device, self._std),
                    map(Path, paths),
                    score_floor=self.score_floor,
                    on_unreadable=refuse,
                    batch_size=self.batch_size,
                    working_spacing_mm=self._working,
                    default_spacing_mm=self.default_spacing_mm,
                )
            ]
            return ScoreResult(scored, refused)
