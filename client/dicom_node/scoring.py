"""A model loaded once, scoring files on demand; reloaded when its file changes.

:class:`ExamScorer` is the "site's current model" of the storage node: the
checkpoint is read at the first exam and again whenever its size or
modification time changes (a new ``mammofed-client export`` replaces it), so
the daemon never needs a restart for a new model. It reuses the pieces of
``mammofed-client predict``: :func:`common.detector.checkpoint.load_model` (safe
loading), the checkpoint's intensity standardizer,
:func:`common.imaging.image_io.read_any`,
:func:`common.detector.engine.predict_images` and
:func:`client.predict.detections_to_stored`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.export import checkpoint_standardizer
from client.predict import detections_to_stored
from common.detector.checkpoint import load_model
from common.detector.engine import predict_images, prepare_model, resolve_device
from common.errors import MammofedError, RefusedImage
from common.imaging.image_io import read_any

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20


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


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
        model, ck = load_model(self.checkpoint)
        self._std = checkpoint_standardizer(ck)
        prepare_model(model, self.device)
        model.score_thresh = self.score_floor  # type: ignore[assignment]
        self._working = float(ck.model_config.working_spacing_mm)
        self.model_sha256 = file_sha256(self.checkpoint)
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
            scored: list[ScoredImage] = []
            refused: list[tuple[Path, str]] = []
            batch: list[tuple[Path, Any]] = []

            def flush() -> None:
                if not batch:
                    return
                tensors = [
                    torch.from_numpy(np.ascontiguousarray(im.pixels)).unsqueeze(0)
                    for _, im in batch
                ]
                if self._std is not None:
                    tensors = [self._std.apply(t) for t in tensors]
                outs = predict_images(model, tensors, self.device)
                for (p, im), dets in zip(batch, outs, strict=True):
                    scored.append(
                        ScoredImage(
                            p,
                            im.meta.sop_instance_uid,
                            detections_to_stored(
                                dets, im.geometry, score_floor=self.score_floor
                            ),
                        )
                    )
                batch.clear()

            for p in map(Path, paths):
                try:
                    image = read_any(
                        p,
                        working_spacing_mm=self._working,
                        default_spacing_mm=self.default_spacing_mm,
                    )
                except (RefusedImage, ValueError) as exc:
                    reason = exc.reason if isinstance(exc, RefusedImage) else str(exc)
                    log.warning("not scored: %s: %s", p, reason)
                    refused.append((p, reason))
                    continue
                batch.append((p, image))
                if len(batch) >= self.batch_size:
                    flush()
            flush()
            return ScoreResult(scored, refused)
