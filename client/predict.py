"""Run a detector checkpoint on image files; write JSON, overlay PNGs, DICOM SR.

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
* ``OUT/<name>.overlay.png``: the SOURCE image as stored (its own orientation:
  a right breast stays on the right), block-averaged down to at most
  ``OVERLAY_MAX_SIDE`` pixels a side, with the stored-space boxes drawn on it
  (mass red, calcification cyan; box / factor in display pixels, the factor is
  in the PNG's ``mammofed-downsample`` text chunk);
* with ``output_format="gsps"``, one Grayscale Softcopy Presentation State
  per DICOM image, ``OUT/<its new SOPInstanceUID>.pr.dcm`` (:mod:`client.gsps`:
  the findings as marks any PACS viewer draws); ``"sr+gsps"``: both;
* with ``output_format="sr"``, also one Mammography CAD SR per exam:
  DICOM inputs are grouped by StudyInstanceUID and each study gets
  ``OUT/<StudyInstanceUID>.sr.dcm`` (:mod:`client.cad_sr`). A PNG/TIFF input
  (or a DICOM without the UIDs an SR needs, or whose Study, Series or SOP
  Instance UID is not a valid DICOM UID, e.g. ``../x`` or ``1.2/3``) cannot
  have one: logged skip naming the file (and the field and value), listed in
  ``PredictResult.sr_skipped``; its JSON is still written. No SR is ever
  written outside ``OUT``.

Several checkpoints run together: each model detects on the same model-space
image and their findings are fused (:func:`fused_detect`,
``common.detector.ensemble``), e.g. the recommended regime: the federation's
personalized model, that model fine-tuned on the site's labels and the one
the site trained alone. They must work at one
spacing.

Files that cannot be read are skipped with a log line naming the file and the
reason; the result lists them. That holds for any error reading one file
(a hostile header included), so one bad image never stops the others. A
checkpoint that carries a site's intensity standardizer
(``extra["standardizer"]``, written by ``mammofed-client export``) has it
applied to every model-space image before the model.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from pydicom.dataset import Dataset
from torch import nn

from client.cad_sr import build_cad_sr, write_cad_sr
from client.dicom_derived import DEFAULT_SCORE_FLOOR
from client.export import checkpoint_paths, load_detectors
from client.gsps import GSPS_SUFFIX, build_exam_gsps, write_gsps
from client.ingest import IMAGES_CSV, SidecarRow, read_images_csv
from common.config.loader import config_to_dict, write_resolved
from common.detector.adapt.standardize import HistogramStandardizer
from common.detector.engine import predict_images, resolve_device
from common.errors import ConfigError, RefusedImage, one_line
from common.imaging.annotations import normalize_ref
from common.imaging.dicom import (
    dcmread_bounded,
    decode_pixels,
    header_text,
    is_dicom,
    is_valid_uid,
    read_dataset,
)
from common.imaging.geometry import Geometry
from common.imaging.image import MAX_SPACING_MM, MIN_SPACING_MM, MammoImage
from common.imaging.image_io import read_any
from common.imaging.preprocess import block_mean
from common.imaging.research_image import load_grey01
from common.imaging.specks import with_speck_clusters
from common.keys import CALCIFICATION, CLASSES, MASS

log = logging.getLogger(__name__)

#: ``output_format`` values: JSON (+ overlay) only, or JSON plus a CAD SR per
#: exam, a presentation state per DICOM image, or both.
FORMAT_JSON = "json"
FORMAT_SR = "sr"
FORMAT_GSPS = "gsps"
FORMAT_SR_GSPS = "sr+gsps"
FORMATS: tuple[str, ...] = (FORMAT_JSON, FORMAT_SR, FORMAT_GSPS, FORMAT_SR_GSPS)
#: Overlay PNGs are block-averaged until no side exceeds this many pixels.
OVERLAY_MAX_SIDE = 1024
#: Overlay box colours (RGB) by class.
OVERLAY_COLOURS: dict[str, tuple[int, int, int]] = {
    MASS: (255, 0, 0),
    CALCIFICATION: (0, 255, 255),
}
#: Suffix of the CAD SR files (``OUT/<StudyInstanceUID>.sr.dcm``).
SR_SUFFIX = ".sr.dcm"


@dataclass
class PredictResult:
    """What :func:`predict_paths` did.

    Attributes:
        written: JSON files written (one per image read).
        skipped: ``(file, reason)`` of inputs that could not be read.
        sr_written: CAD SR files written (``output_format`` ``sr`` or
            ``sr+gsps``).
        sr_skipped: ``(file or study, reason)`` of inputs that got no SR.
        gsps_written: presentation states written (``gsps`` or ``sr+gsps``).
        gsps_skipped: ``(file or study, reason)`` of inputs that got none.
    """

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sr_written: list[Path] = field(default_factory=list)
    sr_skipped: list[tuple[str, str]] = field(default_factory=list)
    gsps_written: list[Path] = field(default_factory=list)
    gsps_skipped: list[tuple[str, str]] = field(default_factory=list)


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
    out = [
        {
            "label": CLASSES[int(lab)],
            "score": round(float(s), 6),
            "box": [round(float(v), 3) for v in b],
        }
        for b, s, lab in zip(stored, scores[keep], labels[keep], strict=True)
    ]
    return sorted(out, key=lambda d: -float(d["score"]))


def stored_record(
    source: str | Path,
    image: MammoImage,
    detections: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """The JSON record of one image's detections (``extra`` before ``detections``).

    ``detections`` as :func:`detections_to_stored` returns them: boxes in the
    stored pixels of ``source`` (see the module docstring for the layout).
    """
    return {
        "source": str(source),
        "sop_instance_uid": image.meta.sop_instance_uid,
        "laterality": image.meta.laterality,
        "box_space": "stored",
        "stored_shape": list(image.geometry.stored_shape),
        **extra,
        "detections": detections,
    }


#: ``detect(model-space pixels of a batch)``: model-space detections per image
#: (``boxes``, ``scores``, ``labels``), as ``common.detector.engine.predict_images``.
Detect = Callable[[list[np.ndarray]], list[dict[str, np.ndarray]]]
#: A file: a path, or its name as the caller gave it.
_F = TypeVar("_F", bound=str | Path)


def torch_detect(
    model: nn.Module, device: torch.device, std: HistogramStandardizer | None
) -> Detect:
    """A torch detector as a :data:`Detect` (standardized by ``std`` when given)."""

    def detect(pixels: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        tensors = [
            torch.from_numpy(np.ascontiguousarray(p)).unsqueeze(0) for p in pixels
        ]
        if std is not None:  # the site's intensity standardization (export)
            tensors = [std.apply(t) for t in tensors]
        return predict_images(model, tensors, device)

    return detect


def fused_detect(detects: Sequence[Detect], spacing_mm: float) -> Detect:
    """Several :data:`Detect` on the same images, findings fused per image.

    ``spacing_mm``: mm per model-space pixel (the fusion's reach is in mm);
    see :func:`common.detector.ensemble.fuse_detections`.
    """
    from common.detector.ensemble import fuse_detections

    def detect(pixels: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        outs = [d(pixels) for d in detects]
        return [
            fuse_detections([o[i] for o in outs], spacing_mm)
            for i in range(len(pixels))
        ]

    return detect


def models_detect(
    loaded: Sequence[tuple[nn.Module, Any, HistogramStandardizer | None]],
    device: torch.device,
) -> Detect:
    """The :data:`Detect` of :func:`client.export.load_detectors`' models.

    One model detects alone; several see the same images and their findings
    are fused (:func:`fused_detect`, at the first model's working spacing,
    which ``load_detectors`` checked they share).
    """
    detects = [torch_detect(m, device, std) for m, _, std in loaded]
    if len(detects) == 1:
        return detects[0]
    return fused_detect(detects, loaded[0][1].model_config.working_spacing_mm)


def detect_files(
    detect: Detect,
    files: Iterable[_F],
    *,
    score_floor: float,
    on_unreadable: Callable[[_F, Exception], None] | None = None,
    batch_size: int = 4,
    per_file: Callable[[_F], dict[str, Any]] | None = None,
    speck_clusters: bool = False,
    **read_options: Any,
) -> Iterator[tuple[_F, MammoImage, list[dict[str, Any]]]]:
    """``(file, image, detections)`` of every readable file, in input order.

    Files are decoded one by one with :func:`common.imaging.image_io.read_any`
    (``read_options``: ``working_spacing_mm`` and the spacing options) and
    detected ``batch_size`` at a time (4: a four-view exam in one forward pass).
    ``detections``: :func:`detections_to_stored` at ``score_floor`` (stored-space
    boxes). ``per_file(f)``: read options of that file that replace
    ``read_options``' (a research site's ``images.csv`` row). A file that
    ``read_any`` refuses (``RefusedImage`` or ``ValueError``) goes to
    ``on_unreadable``, and so does one on which it fails with any other
    ``Exception`` (a header pydicom cannot convert...), passed as a
    ``RefusedImage`` naming the file and the error; the next files are still
    read. Without ``on_unreadable`` the error propagates;
    ``MemoryError`` (and ``KeyboardInterrupt``) always does.
    ``speck_clusters`` (a model's ``ModelConfig.speck_clusters``): each file's
    specks are found as it is read and its calcification findings are their
    clusters (:func:`common.imaging.specks.with_speck_clusters`).
    """
    if speck_clusters:
        read_options = {**read_options, "specks": True}

    def readable() -> Iterator[tuple[_F, MammoImage]]:
        for f in files:
            try:
                own = per_file(f) if per_file is not None else {}
                image = read_any(f, **{**read_options, **own})
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad file, not the batch
                if on_unreadable is None:
                    raise
                if not isinstance(exc, RefusedImage | ValueError):
                    why = f"cannot be read: {one_line(exc)}"
                    refused = RefusedImage(str(f), why)
                    refused.__cause__ = exc
                    exc = refused
                on_unreadable(f, exc)
                continue
            yield f, image

    images = readable()
    while batch := list(itertools.islice(images, batch_size)):
        outs = detect([im.pixels for _, im in batch])
        for (f, im), dets in zip(batch, outs, strict=True):
            if speck_clusters and im.specks is not None:
                dets = with_speck_clusters(dets, im.specks, im.spacing_mm)
            stored = detections_to_stored(dets, im.geometry, score_floor=score_floor)
            yield f, im, stored


def stored_records(
    detect: Detect,
    paths: Sequence[str | Path],
    *,
    score_floor: float,
    working_spacing_mm: float,
    batch_size: int = 4,
    default_spacing_mm: float | None = None,
    spacing_mm: float | None = None,
) -> list[dict[str, Any]]:
    """:func:`stored_record` of every file ``detect`` scores (:func:`detect_files`).

    What the ONNX runners return; unreadable files raise.
    """
    return [
        stored_record(p, im, detections)
        for p, im, detections in detect_files(
            detect,
            paths,
            score_floor=score_floor,
            batch_size=batch_size,
            working_spacing_mm=working_spacing_mm,
            default_spacing_mm=default_spacing_mm,
            spacing_mm=spacing_mm,
        )
    ]


def sidecar_options(paths: Sequence[str | Path]) -> Callable[[Path], dict[str, Any]]:
    """Per-file read options from the ``images.csv`` of each folder in ``paths``.

    A research site folder (``mammofed-sim import-mias`` output, or any site
    with PNG/TIFF images) lists each image's spacing, laterality, view and
    woman in ``images.csv``, as ``ingest`` reads them; ``predict`` on that
    folder reads them the same way, so its images need no ``--spacing-mm``. A
    table row's values replace the command line's for that file; rows the
    table's rules refuse are logged with their reason and the file falls back
    to the command line. DICOM files ignore all of it (their header decides).

    Raises:
        MammofedError: an ``images.csv`` that cannot be read or lacks its
            ``image`` column (named).
    """
    tables: list[tuple[Path, dict[str, SidecarRow]]] = []
    for p in paths:
        folder = Path(p)
        table = folder / IMAGES_CSV
        if not folder.is_dir() or not table.is_file():
            continue
        rows, _ = read_images_csv(table)  # refused rows are logged, named
        log.info("%s: spacing and laterality of %d images", table, len(rows))
        tables.append((folder.resolve(), rows))

    def options(f: Path) -> dict[str, Any]:
        path = Path(f).resolve()
        for root, rows in tables:
            try:
                ref = normalize_ref(path.relative_to(root).as_posix())
            except ValueError:
                continue
            row = rows.get(ref)
            if row is None:
                continue
            # what the row leaves empty stays the command line's
            return {k: v for k, v in row.read_options().items() if v is not None}
        return {}

    return options


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


def stored_display_pixels(
    path: str | Path, *, max_side: int = OVERLAY_MAX_SIDE
) -> tuple[np.ndarray, int]:
    """The source image as stored, for display: ``(uint8[h, w], factor)``.

    Decodes the file again (DICOM: :func:`common.imaging.dicom.decode_pixels`, dense
    bright; PNG/TIFF: :func:`common.imaging.research_image.load_grey01`) without any
    crop or flip, and block-averages it by the smallest integer ``factor`` that
    brings both sides to at most ``max_side`` (the last partial block is padded
    with edge values). Display pixel ``(r, c)`` covers stored pixels
    ``[c*factor, (c+1)*factor) x [r*factor, (r+1)*factor)``, so a stored-space
    box maps to display space by dividing by ``factor``.

    Raises:
        RefusedImage: the file cannot be decoded.
        ValueError: ``max_side < 1``.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side!r}")
    p = Path(path)
    if is_dicom(p):
        unit = decode_pixels(read_dataset(p), p)
    else:
        unit = load_grey01(p)
    factor = max(1, math.ceil(max(unit.shape) / max_side))
    grey = np.clip(np.round(block_mean(unit, factor) * 255.0), 0, 255)
    return grey.astype(np.uint8), factor


def write_overlay(
    source: str | Path,
    detections: Sequence[Mapping[str, Any]],
    path: str | Path,
    score_floor: float,
    *,
    max_side: int = OVERLAY_MAX_SIDE,
) -> Path:
    """PNG of the SOURCE image in its own orientation with stored-space boxes.

    Args:
        source: the image file (DICOM or PNG/TIFF) the detections belong to.
        detections: ``[{"label", "score", "box"}]`` with boxes in the source's
            stored pixel grid (pixel-edge coordinates, origin top-left), as
            :func:`detections_to_stored` returns them.
        path: PNG to write.
        score_floor: only detections scoring at least this are drawn.
        max_side: display size limit (see :func:`stored_display_pixels`).

    Each box is drawn as a 2-pixel outline (mass red, calcification cyan) on
    the display pixels its edges fall in, with ``label score`` above it.
    """
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    grey, factor = stored_display_pixels(source, max_side=max_side)
    img = Image.fromarray(grey, mode="L").convert("RGB")
    draw = ImageDraw.Draw(img)
    h, w = grey.shape
    for det in detections:
        score = float(det["score"])
        if score < score_floor:
            continue
        colour = OVERLAY_COLOURS[str(det["label"])]
        x0, y0, x1, y1 = (float(v) / factor for v in det["box"])
        left = min(max(math.floor(x0), 0), w - 1)
        top = min(max(math.floor(y0), 0), h - 1)
        right = min(max(math.ceil(x1) - 1, left), w - 1)
        bottom = min(max(math.ceil(y1) - 1, top), h - 1)
        draw.rectangle((left, top, right, bottom), outline=colour, width=2)
        draw.text((left, max(top - 11, 0)), f"{det['label']} {score:.2f}", fill=colour)
    info = PngInfo()
    info.add_text("mammofed-downsample", str(factor))
    info.add_text("mammofed-box-space", "stored")
    out = Path(path)
    img.save(out, pnginfo=info)
    return out


@dataclass
class _StudyEntry:
    """One DICOM input of a study waiting for its CAD SR or presentation state."""

    source: Path
    header: Dataset
    detections: list[dict[str, Any]]


def _referable_header(f: Path) -> tuple[Dataset | None, str]:
    """``(header, "")`` of a DICOM input a derived object can reference, else why.

    Its Study, Series and SOP Instance UIDs must be present and valid DICOM
    UIDs (:func:`common.imaging.dicom.is_valid_uid`); ``why`` names the field
    and the value.
    """
    if not is_dicom(f):
        return None, (
            "not a DICOM file: a DICOM CAD SR or presentation state can only "
            "reference DICOM images"
        )
    try:
        header = dcmread_bounded(f, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types
        return None, f"header unreadable: {exc}"
    uids = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    missing = [k for k in uids if not header_text(header, k)]
    if missing:
        return None, f"no {', '.join(missing)}: an SR cannot reference it"
    for keyword in uids:  # the Study UID names the SR file: no '/' nor '..'
        uid = header_text(header, keyword)
        if not is_valid_uid(uid):
            return None, (
                f"{keyword}={uid!r} is not a valid DICOM UID (digits and dots, "
                "at most 64 characters): an SR cannot reference it"
            )
    return header, ""


def _write_study_gsps(
    study_uid: str,
    entries: Sequence[_StudyEntry],
    out: Path,
    result: PredictResult,
    *,
    score_floor: float,
) -> None:
    """One ``OUT/<SOPInstanceUID>.pr.dcm`` per image of a study (:mod:`client.gsps`).

    The file names are the presentation states' own new UIDs (digits and
    dots): nothing from the sources names a file.
    """
    files = ", ".join(str(e.source) for e in entries)
    try:
        states = build_exam_gsps(
            [e.header for e in entries],
            [e.detections for e in entries],
            score_floor=score_floor,
        )
    except ValueError as exc:
        log.warning(
            "no presentation states for study %s (%s): %s", study_uid, files, exc
        )
        result.gsps_skipped.append((f"study {study_uid}: {files}", str(exc)))
        return
    for ps in states:
        try:
            path = write_gsps(ps, out / f"{ps.SOPInstanceUID}{GSPS_SUFFIX}")
        except (ValueError, OSError) as exc:  # a value pydicom cannot encode
            log.warning(
                "presentation state of study %s not written: %s", study_uid, exc
            )
            result.gsps_skipped.append((f"study {study_uid}: {files}", str(exc)))
            continue
        result.gsps_written.append(path)
    log.info("study %s: %d presentation states -> %s", study_uid, len(states), out)


def _write_study_reports(
    studies: Mapping[str, Sequence[_StudyEntry]],
    out: Path,
    result: PredictResult,
    *,
    score_floor: float,
    sr: bool = True,
    gsps: bool = False,
) -> None:
    """Per study: its CAD SR and/or presentation states; failures are logged skips.

    ``sr``: ``OUT/<StudyInstanceUID>.sr.dcm``; ``gsps``: one presentation
    state per image (:func:`_write_study_gsps`).

    A file name that would place the SR in another folder than ``out``
    (``..``, ``/`` in the UID) is a logged skip too, whatever
    :func:`_referable_header` let through: nothing is written outside ``out``.
    """
    for study_uid, entries in studies.items():
        if gsps:
            _write_study_gsps(study_uid, entries, out, result, score_floor=score_floor)
        if not sr:
            continue
        files = ", ".join(str(e.source) for e in entries)
        try:
            ds = build_cad_sr(
                [e.header for e in entries],
                [e.detections for e in entries],
                score_floor=score_floor,
            )
        except ValueError as exc:
            log.warning("no CAD SR for study %s (%s): %s", study_uid, files, exc)
            result.sr_skipped.append((f"study {study_uid}: {files}", str(exc)))
            continue
        target = out / f"{study_uid}{SR_SUFFIX}"
        if target.parent.resolve() != out.resolve():  # second layer: UIDs checked
            why = f"SR file {target} would resolve outside {out}: not written"
            log.error("no CAD SR for study %r (%s): %s", study_uid, files, why)
            result.sr_skipped.append((f"study {study_uid}: {files}", why))
            continue
        try:
            path = write_cad_sr(ds, target)
        except (ValueError, OSError) as exc:  # a value pydicom cannot encode
            log.warning(
                "CAD SR of study %s (%s) not written: %s", study_uid, files, exc
            )
            result.sr_skipped.append((f"study {study_uid}: {files}", str(exc)))
            continue
        result.sr_written.append(path)
        n = sum(len(e.detections) for e in entries)
        log.info(
            "study %s: %d images, %d findings -> %s", study_uid, len(entries), n, path
        )


def predict_paths(
    checkpoint: str | Path | Sequence[str | Path],
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
    output_format: str = FORMAT_JSON,
    sr_display_floor: float = DEFAULT_SCORE_FLOOR,
) -> PredictResult:
    """Detect lesions in every input file; write one JSON (+ overlay) per image.

    ``checkpoint``: one model file, or several run together with their
    findings fused (:func:`fused_detect`; they must share the working spacing).
    ``score_floor`` lowers/raises the model's own score threshold for this run.
    ``spacing_mm`` is the stored pixel spacing of PNG/TIFF inputs;
    ``default_spacing_mm`` the fallback for DICOM without spacing. Overlays draw
    detections scoring at least ``max(score_floor, overlay_floor)`` on the
    source image (stored orientation). Images are decoded one by one and run
    through the model ``batch_size`` at a time (4: a four-view exam in one
    forward pass). ``output_format="sr"`` also writes one Mammography CAD SR per
    study (see the module docstring); findings scoring at least
    ``sr_display_floor`` are "Presentation Required" in it, the others
    "Presentation Optional". ``"gsps"`` writes instead one Grayscale Softcopy
    Presentation State per DICOM image (:mod:`client.gsps`), drawing the
    findings that score at least ``sr_display_floor``; ``"sr+gsps"`` both.
    ``OUT/resolved_config.yaml`` records the checkpoint's model config and
    these settings.

    Raises:
        ValueError: ``score_floor`` or ``sr_display_floor`` outside [0, 1], or an
            unknown ``output_format``.
        ConfigError: ``spacing_mm`` or ``default_spacing_mm`` outside the
            plausible ``[MIN_SPACING_MM, MAX_SPACING_MM]`` mm (naming the flag
            and the value), before any model is loaded or image read: both
            readers would refuse every image it applies to.
        CheckpointMismatch: an unusable checkpoint, or checkpoints that work
            at different spacings.
    """
    if not 0.0 <= score_floor <= 1.0:
        raise ValueError(f"score_floor must be in [0, 1], got {score_floor!r}")
    if not 0.0 <= sr_display_floor <= 1.0:
        raise ValueError(
            f"sr_display_floor must be in [0, 1], got {sr_display_floor!r}"
        )
    if output_format not in FORMATS:
        raise ValueError(
            f"output_format={output_format!r}; valid formats: {', '.join(FORMATS)}"
        )
    for key, value in (
        ("spacing_mm (--spacing-mm)", spacing_mm),
        ("default_spacing_mm (--default-spacing-mm)", default_spacing_mm),
    ):
        if value is not None and not MIN_SPACING_MM <= value <= MAX_SPACING_MM:
            raise ConfigError(  # NaN fails the test too
                "predict",
                key,
                f"{value!r} mm is outside the plausible [{MIN_SPACING_MM}, "
                f"{MAX_SPACING_MM}] mm per pixel of a mammogram",
            )
    sr = output_format in (FORMAT_SR, FORMAT_SR_GSPS)
    gsps = output_format in (FORMAT_GSPS, FORMAT_SR_GSPS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device, "--device")
    paths_in = checkpoint_paths(checkpoint)
    loaded = load_detectors(paths_in, dev, use_ema=use_ema, score_floor=score_floor)
    ck, std = loaded[0][1], loaded[0][2]
    detect = models_detect(loaded, dev)
    names = ", ".join(map(str, paths_in))
    write_resolved(
        {
            "checkpoint": names,
            "checkpoints": [str(c) for c in paths_in],
            "model": config_to_dict(ck.model_config),
            "score_floor": score_floor,
            "spacing_mm": spacing_mm,
            "default_spacing_mm": default_spacing_mm,
            "use_ema": use_ema,
            "standardizer": std.to_dict() if std is not None else None,
            "output_format": output_format,
            "sr_display_floor": sr_display_floor,
        },
        out,
    )
    result = PredictResult()
    used: set[str] = set()
    studies: dict[str, list[_StudyEntry]] = {}

    def skip(f: Path, exc: Exception) -> None:
        log.warning("skipped %s: %s", f, exc)
        result.skipped.append((str(f), str(exc)))

    for f, image, detections in detect_files(
        detect,
        expand_inputs(paths),
        score_floor=score_floor,
        on_unreadable=skip,
        batch_size=batch_size,
        per_file=sidecar_options(paths),
        speck_clusters=ck.model_config.speck_clusters,
        working_spacing_mm=ck.model_config.working_spacing_mm,
        default_spacing_mm=default_spacing_mm,
        spacing_mm=spacing_mm,
    ):
        doc = stored_record(
            f,
            image,
            detections,
            model_spacing_mm=image.spacing_mm,
            checkpoint=names,
        )
        name = _unique_name(f.stem, used)
        jpath = out / f"{name}.json"
        jpath.write_text(json.dumps(doc, indent=2))
        if overlay:
            write_overlay(
                f,
                detections,
                out / f"{name}.overlay.png",
                max(score_floor, overlay_floor),
            )
        result.written.append(jpath)
        log.info("%s: %d detections -> %s", f, len(detections), jpath)
        if sr or gsps:
            header, why = _referable_header(f)
            if header is None:
                log.warning("no DICOM output for %s: %s", f, why)
                if sr:
                    result.sr_skipped.append((str(f), why))
                if gsps:
                    result.gsps_skipped.append((str(f), why))
            else:
                entry = _StudyEntry(f, header, detections)
                study = header_text(header, "StudyInstanceUID")  # checked UID
                studies.setdefault(study, []).append(entry)
    if sr or gsps:
        _write_study_reports(
            studies, out, result, score_floor=sr_display_floor, sr=sr, gsps=gsps
        )
    return result
