"""Several ONNX detectors run as one: the recommended regime outside mammofed.

The study's recommended regime runs three models at a site (the federation's
personalized model, that model fine-tuned on the site's labels, and the
site's own) and fuses their findings
(:mod:`common.detector.ensemble`). :func:`export_onnx_ensemble` writes, for
``OUT.ensemble.json``:

* every member as a normal single export (:func:`client.onnx_export.export_onnx`):
  ``OUT.m<i>.onnx`` with its contract and model card, so each member can also
  be run alone;
* ``OUT.ensemble.json`` (:data:`ENSEMBLE_FORMAT`): the members in order, the
  SHA-256 of each member's graph, contract and card, the working spacing they
  share, and the fusion rule in words and numbers, so that a tool outside
  mammofed can run each graph by its contract and fuse the findings itself.

The fusion stays out of the graphs for the reason decoding and NMS do
(:mod:`client.onnx_export`): it is greedy and data-dependent. Each member
decodes and suppresses its own detections in model space (score threshold:
its contract's, or the run's score floor); the members' detections of one
image are then fused in model space (reach in mm at ``working_spacing_mm``)
and the floor is applied to the fused findings, as ``mammofed-client
predict`` does with several ``--checkpoint``.

:class:`OnnxEnsemble` is that runner with onnxruntime; it refuses a manifest
whose member files do not match the recorded SHA-256, and each member's card
is checked as :class:`client.onnx_export.OnnxDetector` checks it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.export import ExportError
from client.model_card import card_paths
from client.onnx_export import (
    DEFAULT_OPSET,
    OnnxDetector,
    contract_path,
    export_onnx,
)
from client.predict import fused_detect, stored_records
from common.detector.checkpoint import load_checkpoint
from common.detector.froc import MIN_HIT_RADIUS_MM
from common.fileio import atomic_write_text, read_json_document, sha256_file

log = logging.getLogger(__name__)

ENSEMBLE_FORMAT = "mammofed-onnx-ensemble/1"
ENSEMBLE_SUFFIX = ".ensemble.json"

#: The fusion rule of :func:`common.detector.ensemble.fuse_detections`, as the
#: manifest states it for tools that implement it themselves.
FUSION_RULE: dict[str, Any] = {
    "method": "weighted box fusion with the FROC hit radius (Solovyev et al. 2021)",
    "space": "model space of the members (before Geometry.to_stored), per image "
    "and class",
    "grouping": "all members' detections in decreasing score (stable); each joins "
    "the first group that holds no detection of its own member and whose first "
    "detection's centre is within reach, else opens a group",
    "reach_mm": f"max(half the diagonal of the group's first box, "
    f"{MIN_HIT_RADIUS_MM:g}) in mm at working_spacing_mm",
    "box": "score-weighted mean of the group's boxes",
    "score": "sum of the group's scores / number of members (a finding of one "
    "member keeps 1/M of its score)",
    "score_floor": "a run's score floor is each member's score threshold "
    "(postprocessing.score_thresh of its contract by default) and is applied "
    "again to the fused findings",
}


def ensemble_member_path(out: Path, index: int) -> Path:
    """``OUT.m<index>.onnx`` beside ``OUT.ensemble.json``."""
    stem = out.name[: -len(ENSEMBLE_SUFFIX)]
    return out.with_name(f"{stem}.m{index}.onnx")


def export_onnx_ensemble(
    checkpoints: Sequence[str | Path],
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    use_ema: bool = False,
) -> Path:
    """Export every checkpoint as a member and write the manifest; returns it.

    Raises:
        ExportError: fewer than two checkpoints, an output name without
            ``.ensemble.json``, or members at different working spacings (the
            fusion's reach is in mm of one model space).
    """
    out_path = Path(out)
    if not out_path.name.endswith(ENSEMBLE_SUFFIX) or out_path.is_dir():
        raise ExportError(
            f"{out_path}: an ensemble export must name a file ending in "
            f"{ENSEMBLE_SUFFIX}"
        )
    if len(checkpoints) < 2:
        raise ExportError(
            f"{out_path}: an ensemble needs at least two checkpoints, got "
            f"{len(checkpoints)}"
        )
    # every member's spacing before any file is written: a refused ensemble
    # leaves no member behind
    spacing = load_checkpoint(checkpoints[0]).model_config.working_spacing_mm
    for ck in checkpoints[1:]:
        s = load_checkpoint(ck).model_config.working_spacing_mm
        if not math.isclose(s, spacing, rel_tol=1e-9):
            raise ExportError(
                f"{ck}: working_spacing_mm {s:g} differs from the first member's "
                f"{spacing:g}; the members of an ensemble must share one model space"
            )
    members: list[dict[str, Any]] = []
    for i, ck in enumerate(checkpoints):
        exp = export_onnx(
            ck, ensemble_member_path(out_path, i), opset=opset, use_ema=use_ema
        )
        members.append(
            {
                "onnx": exp.onnx.name,
                "onnx_sha256": sha256_file(exp.onnx),
                "contract": exp.contract.name,
                "contract_sha256": sha256_file(exp.contract),
                "card": exp.card_json.name,
                "card_sha256": sha256_file(exp.card_json),
                "checkpoint_sha256": sha256_file(Path(ck)),
            }
        )
    manifest = {
        "format": ENSEMBLE_FORMAT,
        "working_spacing_mm": spacing,
        "members": members,
        "fusion": FUSION_RULE,
    }
    atomic_write_text(out_path, json.dumps(manifest, indent=2) + "\n")
    log.info("wrote ensemble %s of %d members", out_path, len(members))
    return out_path


class OnnxEnsemble:
    """Runs an ensemble manifest's members with onnxruntime and fuses them.

    Same surface as :class:`client.onnx_export.OnnxDetector`: :meth:`detect`
    (model space) and :meth:`predict_files` (records in stored pixels).
    """

    def __init__(self, manifest: str | Path, *, threads: int | None = None) -> None:
        """Load and check ``manifest`` and every member it lists.

        Raises:
            ExportError: another format, a malformed field, a member file
                missing or not matching its recorded SHA-256, or members at
                different working spacings; ModelIntegrityError: a member's card.
        """
        self.path = Path(manifest)
        doc = read_json_document(
            self.path, "ONNX ensemble manifest", ExportError, format_id=ENSEMBLE_FORMAT
        )
        try:
            rows = doc["members"]
            self.working_spacing_mm = float(doc["working_spacing_mm"])
            if not isinstance(rows, list) or len(rows) < 2:
                raise ValueError(f"members must list at least two, got {rows!r}")
            names = [(str(r["onnx"]), str(r["contract"]), str(r["card"])) for r in rows]
            sums = [
                (
                    str(r["onnx_sha256"]),
                    str(r["contract_sha256"]),
                    str(r["card_sha256"]),
                )
                for r in rows
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(
                f"{self.path}: malformed manifest field: {exc!r}"
            ) from exc
        self.members: list[OnnxDetector] = []
        for i, (files, want) in enumerate(zip(names, sums, strict=True)):
            for name, digest in zip(files, want, strict=True):
                p = self.path.parent / name
                if Path(name).name != name:
                    raise ExportError(
                        f"{self.path}: members[{i}] names {name!r}, not a file "
                        "beside the manifest"
                    )
                if not p.is_file():
                    raise ExportError(f"{self.path}: members[{i}]: {p} is missing")
                if sha256_file(p) != digest:
                    raise ExportError(
                        f"{self.path}: members[{i}]: {p.name} does not match the "
                        "SHA-256 the manifest records; the file was changed"
                    )
            member = OnnxDetector(self.path.parent / files[0], threads=threads)
            if contract_path(member.path).name != files[1] or (
                card_paths(member.path)[0].name != files[2]
            ):
                raise ExportError(
                    f"{self.path}: members[{i}]: contract or card name does not "
                    f"belong to {files[0]}"
                )
            if not math.isclose(
                member.working_spacing_mm, self.working_spacing_mm, rel_tol=1e-9
            ):
                raise ExportError(
                    f"{self.path}: members[{i}] works at "
                    f"{member.working_spacing_mm:g} mm, the manifest at "
                    f"{self.working_spacing_mm:g} mm"
                )
            self.members.append(member)
        self.score_floor = min(m.post.score_thresh for m in self.members)
        #: the members' findings fused as ``predict`` fuses several checkpoints
        self._fused = fused_detect(
            [m.detect for m in self.members], self.working_spacing_mm
        )

    def with_score_floor(self, score_floor: float) -> OnnxEnsemble:
        """Set every member's score threshold and the fused findings' floor.

        As ``mammofed-client predict --score-floor`` sets them for several models.
        """
        if not 0.0 <= score_floor <= 1.0:
            raise ValueError(f"score_floor must be in [0, 1], got {score_floor!r}")
        for m in self.members:
            m.with_score_floor(score_floor)
        self.score_floor = float(score_floor)
        return self

    def detect(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Model-space findings of every member, fused per image."""
        return self._fused(list(images))

    def predict_files(
        self,
        paths: Sequence[str | Path],
        *,
        batch_size: int = 4,
        default_spacing_mm: float | None = None,
        spacing_mm: float | None = None,
    ) -> list[dict[str, Any]]:
        """One record per readable file, as ``mammofed-client predict`` writes."""
        return stored_records(
            self.detect,
            paths,
            score_floor=self.score_floor,
            working_spacing_mm=self.working_spacing_mm,
            batch_size=batch_size,
            default_spacing_mm=default_spacing_mm,
            spacing_mm=spacing_mm,
        )


__all__ = [
    "ENSEMBLE_FORMAT",
    "OnnxEnsemble",
    "ensemble_member_path",
    "export_onnx_ensemble",
]
