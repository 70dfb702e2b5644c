"""Run a detector checkpoint on image files; write JSON and overlay PNGs.

For every input image (DICOM by content; PNG/TIFF research images need a
spacing) :func:`predict_paths` writes

* ``OUT/<name>.json``::

      {"source": path, "sop_instance_uid": uid or null, "laterality": "L"|"R",
       "box_space": "stored",
       "stored_shape": [rows, cols],
       "detections": [{"label": "mass", "score": 0.93,
                       "box": [xmin, ymin, xmax, ymax]}, ...]}

  with boxes in the SOURCE file's stored pixel grid (pixel-edge coordinates,
  origin top-left, before any flip), mapped by ``Geometry.to_stored``;
* ``OUT/<name>.overlay.png``: the model-space image (breast on the left, at the
  working spacing) with the detections drawn in model space.

Files that cannot be read are skipped with a log line naming the file and the
reason; the result lists them. A checkpoint that carries a site's intensity
standardizer (``extra["standardizer"]``, written by ``mammofed-client export``)
has it applied to every model-space image before the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.export import checkpoint_standardizer
from common.checkpoint import load_model
from common.config.loader import config_to_dict, write_resolved
from common.engine import predict_images, prepare_model, resolve_device
from common.errors import RefusedImage
from common.geometry import Geometry
from common.image import MammoImage
from common.image_io import read_any
from common.keys import CLASSES

log = logging.getLogger(__name__)


@dataclass
class PredictResult:
    """What :func:`predict_paths` did: JSON files written, inputs skipped."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def detections_to_stored(
    dets: dict[str, np.ndarray], geometry: Geometry, *, score_floor: float = 0.0
) -> list[dict[str, Any]]:
    """Model-space detections -> JSON-ready list with stored-space boxes.

    Args:
        dets: ``boxes`` float[K, 4] model space, ``scores`` float[K],
            ``labels`` int[K].
        geometry: the image's stored -> model mapping.
        score_floor: detections scoring below it are dropped.

    Returns:
        ``[{"label", "score", "box": [xmin, ymin, xmax, ymax] stored space}]``
        sorted by decreasing score.
    """
    boxes = np.asarray(dets["boxes"], dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(dets["scores"], dtype=np.float64).reshape(-1)
    labels = np.asarray(dets["labels"], dtype=np.int64).reshape(-1)
    keep = scores >= score_floor
    stored = geometry.to_stored(boxes[keep])
    out: list[dict[str, Any]] = []
    for b, s, lab in zip(stored, scores[keep], labels[keep], strict=True):
        out.append(
            {
                "label": CLASSES[int(lab)],
                "score": round(float(s), 6),
                "box": [round(float(v), 3) for v in b],
            }
        )
    out.sort(key=lambda d: -float(d["score"]))
    return out


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given plus image files found under given folders (sorted)."""
    from client.ingest import find_candidates

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(find_candidates(p))
        else:
            files.append(p)
    return files


def _unique_name(stem: str, used: set[str]) -> str:
    name, i = stem, 1
    while name in used:
        name = f"{stem}-{i}"
        i += 1
    used.add(name)
    return name


def write_overlay(
    image: MammoImage, dets: dict[str, np.ndarray], path: Path, score_floor: float
) -> Path:
    """PNG of the model-space image with model-space boxes (mass red, calc cyan)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    h, w = image.pixels.shape
    fig = plt.figure(figsize=(w / 100, h / 100), dpi=100)
    try:
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
        ax.imshow(image.pixels, cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        colors = ("red", "cyan")
        for b, s, lab in zip(
            dets["boxes"], dets["scores"], dets["labels"], strict=True
        ):
            if s < score_floor:
                continue
            c = colors[int(lab) % len(colors)]
            ax.add_patch(
                Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec=c)
            )
            ax.text(b[0], b[1], f"{CLASSES[int(lab)]} {s:.2f}", color=c, fontsize=6)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def predict_paths(
    checkpoint: str | Path,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    score_floor: float = 0.01,
    spacing_mm: float | None = None,
    default_spacing_mm: float | None = None,
    device: str = "auto",
    use_ema: bool = False,
    overlay: bool = True,
    overlay_floor: float = 0.3,
    batch_size: int = 4,
) -> PredictResult:
    """Detect lesions in every input file; write one JSON (+ overlay) per image.

    ``score_floor`` lowers/raises the model's own score threshold for this run.
    ``spacing_mm`` is the stored pixel spacing of PNG/TIFF inputs;
    ``default_spacing_mm`` the fallback for DICOM without spacing. Overlays draw
    detections scoring at least ``max(score_floor, overlay_floor)``. Images are
    decoded one by one and run through the model ``batch_size`` at a time (4: a
    four-view exam in one forward pass). ``OUT/resolved_config.yaml`` records
    the checkpoint's model config and these settings.
    """
    if not 0.0 <= score_floor <= 1.0:
        raise ValueError(f"score_floor must be in [0, 1], got {score_floor!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    model, ck = load_model(checkpoint, use_ema=use_ema)
    std = checkpoint_standardizer(ck)
    prepare_model(model, dev)
    model.score_thresh = float(score_floor)  # type: ignore[assignment]
    working = ck.model_config.working_spacing_mm
    write_resolved(
        {
            "checkpoint": str(checkpoint),
            "model": config_to_dict(ck.model_config),
            "score_floor": score_floor,
            "spacing_mm": spacing_mm,
            "default_spacing_mm": default_spacing_mm,
            "use_ema": use_ema,
            "standardizer": std.to_dict() if std is not None else None,
        },
        out,
    )
    result = PredictResult()
    used: set[str] = set()
    pending: list[tuple[Path, Any]] = []

    def flush() -> None:
        # One forward pass per batch (a four-view exam by default).
        if not pending:
            return
        tensors = [
            torch.from_numpy(np.ascontiguousarray(im.pixels)).unsqueeze(0)
            for _, im in pending
        ]
        if std is not None:  # the site's intensity standardization (export)
            tensors = [std.apply(t) for t in tensors]
        for (f, image), dets in zip(
            pending, predict_images(model, tensors, dev), strict=True
        ):
            _write_one(f, image, dets)
        pending.clear()

    def _write_one(f: Path, image: Any, dets: dict[str, np.ndarray]) -> None:
        detections = detections_to_stored(dets, image.geometry, score_floor=score_floor)
        doc: dict[str, Any] = {
            "source": str(f),
            "sop_instance_uid": image.meta.sop_instance_uid,
            "laterality": image.meta.laterality,
            "box_space": "stored",
            "stored_shape": list(image.geometry.stored_shape),
            "model_spacing_mm": image.spacing_mm,
            "checkpoint": str(checkpoint),
            "detections": detections,
        }
        name = _unique_name(f.stem, used)
        jpath = out / f"{name}.json"
        jpath.write_text(json.dumps(doc, indent=2))
        if overlay:
            write_overlay(
                image,
                dets,
                out / f"{name}.overlay.png",
                max(score_floor, overlay_floor),
            )
        result.written.append(jpath)
        log.info("%s: %d detections -> %s", f, len(detections), jpath)

    for f in expand_inputs(paths):
        try:
            image = read_any(
                f,
                working_spacing_mm=working,
                default_spacing_mm=default_spacing_mm,
                spacing_mm=spacing_mm,
            )
        except (RefusedImage, ValueError) as exc:
            log.warning("skipped %s: %s", f, exc)
            result.skipped.append((str(f), str(exc)))
            continue
        pending.append((f, image))
        if len(pending) >= batch_size:
            flush()
    flush()
    return result
