"""A model loaded once, scoring files on demand; reloaded when its file changes.

:class:`ExamScorer` is the "site's current model" of the storage node: the
checkpoint is read at the first exam and again whenever its size or
modification time changes (a new ``mammofed-client export`` replaces it), so
the daemon never needs a restart for a new model. Several checkpoints (the
recommended regime: the federation's personalized model, that model
fine-tuned on the site's labels and the site's local-only model) run on
every image and their findings are fused. It scores
as ``mammofed-client predict`` does: :func:`client.export.load_detectors`
(safe loading, each checkpoint's intensity standardizer),
:func:`client.predict.models_detect` and :func:`client.predict.detect_files`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.export import checkpoint_paths, load_detectors
from client.predict import Detect, detect_files, models_detect
from common.config.site import DEFAULT_MAX_PIXELS
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
        checkpoint: the model file, or several run together on every image
            with their findings fused (:func:`client.predict.models_detect`;
            they must share the working spacing).
        score_floor: detections below it are dropped (also the model's own
            score threshold).
        default_spacing_mm: stored spacing for DICOM files without one (the
            site config's); ``None`` refuses them.
        max_pixels: the site's pixel budget (``SiteConfig.max_pixels``),
            checked from each file's header before it is decoded; a file over
            it is refused, not scored. ``None``: no budget.
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: images per forward pass (4: a four-view exam at once).

    Attributes:
        model_sha256: SHA-256 of the model file; of several, the SHA-256 of
            their SHA-256s in order (one identifier for the ensemble).
    """

    def __init__(
        self,
        checkpoint: str | Path | Sequence[str | Path],
        *,
        score_floor: float,
        default_spacing_mm: float | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        device: str = "auto",
        batch_size: int = 4,
    ) -> None:
        if not 0.0 <= score_floor <= 1.0:
            raise ValueError(f"score_floor must be in [0, 1], got {score_floor!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.checkpoints = checkpoint_paths(checkpoint)
        if not self.checkpoints:
            raise ValueError("checkpoint: give at least one model file")
        self.score_floor = float(score_floor)
        self.default_spacing_mm = default_spacing_mm
        self.max_pixels = max_pixels
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self._lock = threading.Lock()
        self._signature: tuple[tuple[int, int], ...] | None = None
        self._detect: Detect | None = None
        self._working = 0.0
        self._specks = False
        self._sha256s: list[str] = []
        self.model_sha256 = ""

    @property
    def checkpoint(self) -> Path:
        """The (first) model file."""
        return self.checkpoints[0]

    def members(self) -> list[dict[str, str]]:
        """``[{"path", "sha256"}]`` of the loaded model files, in order."""
        return [
            {"path": str(p), "sha256": h}
            for p, h in zip(self.checkpoints, self._sha256s, strict=True)
        ]

    def model_label(self) -> str:
        """Short provenance for the SR: ``model <sha12>`` or ``models <sha12>+...``."""
        if len(self._sha256s) == 1:
            return f"model {self._sha256s[0][:12]}"
        return "models " + "+".join(h[:12] for h in self._sha256s)

    def load(self) -> None:
        """Load the model now (fail fast at start rather than at the first exam).

        Raises:
            MammofedError: the checkpoint cannot be read or does not fit.
        """
        with self._lock:
            self._ensure_model()

    def _ensure_model(self) -> Detect:
        """Load the checkpoints if not loaded yet or if any file changed."""
        sig = []
        for path in self.checkpoints:
            try:
                st = path.stat()
            except OSError as exc:
                raise MammofedError(
                    f"{path}: model checkpoint unreadable: {exc}"
                ) from exc
            sig.append((st.st_size, st.st_mtime_ns))
        if self._detect is not None and tuple(sig) == self._signature:
            return self._detect
        loaded = load_detectors(
            self.checkpoints, self.device, score_floor=self.score_floor
        )
        ck = loaded[0][1]
        self._working = float(ck.model_config.working_spacing_mm)
        self._specks = bool(ck.model_config.speck_clusters)
        self._sha256s = [sha256_file(p) for p in self.checkpoints]
        self.model_sha256 = (
            self._sha256s[0]
            if len(self._sha256s) == 1
            else hashlib.sha256("".join(self._sha256s).encode()).hexdigest()
        )
        self._detect = models_detect(loaded, self.device)
        self._signature = tuple(sig)
        log.info(
            "%s loaded (%s, %s, working spacing %.3g mm)",
            ", ".join(map(str, self.checkpoints)), self.model_label(),
            ck.model_config.arch, self._working,
        )  # fmt: skip
        return self._detect

    def score(self, paths: Sequence[str | Path]) -> ScoreResult:
        """Detections for every readable file; unreadable ones listed with a reason.

        Raises:
            MammofedError: the checkpoint cannot be read or does not fit.
        """
        with self._lock:
            detect = self._ensure_model()
            refused: list[tuple[Path, str]] = []

            def refuse(p: Path, exc: Exception) -> None:
                reason = exc.reason if isinstance(exc, RefusedImage) else str(exc)
                log.warning("not scored: %s: %s", p, reason)
                refused.append((p, reason))

            scored = [
                ScoredImage(p, image.meta.sop_instance_uid, detections)
                for p, image, detections in detect_files(
                    detect,
                    map(Path, paths),
                    score_floor=self.score_floor,
                    on_unreadable=refuse,
                    batch_size=self.batch_size,
                    speck_clusters=self._specks,
                    working_spacing_mm=self._working,
                    default_spacing_mm=self.default_spacing_mm,
                    max_pixels=self.max_pixels,
                )
            ]
            return ScoreResult(scored, refused)
