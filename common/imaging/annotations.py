"""Reading a site's annotations (``annotations.csv`` or COCO JSON).

Site contract (columns :data:`common.keys.ANNOTATION_COLUMNS`):

* ``image``: path relative to ``SITE_DIR`` (``/`` separators) or a DICOM
  SOPInstanceUID;
* ``finding``: ``mass``, ``calcification``, ``ignore``, ``none`` or a site word
  mapped by :attr:`common.config.site.SiteConfig.findings`;
* ``xmin, ymin, xmax, ymax``: box in **stored** pixels of the file (pixel-edge
  coordinates, origin top-left, before any flip), ``xmin < xmax``,
  ``ymin < ymax``.

Meaning of rows per image:

* no row at all: the image is *unlabeled*;
* a ``none`` row: the image is labeled and normal;
* a lesion (or ignore) row with a box: a box target (or ignore region);
* a lesion row with all four coordinates empty: an *image-level* label. The
  image is kept and marked **weakly labeled**: training excludes it from box
  supervision (it is not in the ``labeled`` view, because the detector would
  learn its lesion as background) but it stays in the manifest and the
  ``unlabeled`` view (labels hidden) and its records say ``weak=True``.
  An ``ignore`` row without a box makes the image weakly labeled too.

Every broken row is skipped with a warning naming the file, row number, field
and value (bad numbers, ``xmin >= xmax``, unknown finding word, partly filled
coordinates); the rest is kept. A skipped row may have been a lesion, so its
image claims no more than is known (:func:`_settle_skipped`): with nothing
else, or only a ``none`` row, it is left *unlabeled*, not normal; beside kept
lesions it is made *weakly labeled*, so no lesion is learned as background.
A file that is not valid CSV (e.g. a field over 128 KiB) or names a column
twice is refused (:class:`AnnotationError`).

Rows that would make a metric silently wrong are skipped with a warning naming
both rows (:func:`_drop_conflicts`): a row repeating an earlier row of the same
image (same kind and box, or both without a box) would be a second
ground-truth box of one lesion; a ``none`` row of an image that also has a
lesion row (mass or calcification) contradicts it, and the lesion is kept (a
``none`` row beside a lesion is most likely a leftover). The same holds
between rows that name one image by path and by SOPInstanceUID
(:func:`match_annotations`). Whether
the ``image`` exists is checked later, by :func:`match_annotations`, against
the ingested images, and boxes are checked against the image there
(:func:`targets_for`): an overhang of up to :data:`CLIP_TOLERANCE_PX` px is
clipped silently, a larger one is clipped with a warning, and a lesion box with
more than half its area outside the image is skipped (the image keeps the
lesion as an image-level label).

COCO input (``annotations.json``): ``images[{id, file_name}]``,
``annotations[{image_id, category_id, bbox: [x, y, w, h]}]`` (stored pixels,
origin top-left), ``categories[{id, name}]``; ``name`` is a finding word. Ids
are strings or integers (not ``true``/``false``); bbox values are numbers (not
booleans) finite as floats. An image listed in ``images`` with no annotation is
labeled normal (listing it is the explicit statement); skipped annotations
settle the image as skipped CSV rows do. An
annotation without ``bbox`` is an image-level label. A repeated image id skips
the later entry; a category id given twice with different names refuses the
file (:class:`AnnotationError`), as does JSON nested too deeply to parse.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeGuard

import numpy as np

from common.errors import AnnotationError, MammofedError
from common.fileio import read_json_document
from common.imaging.geometry import Geometry
from common.keys import (
    ANNOTATION_COLUMNS,
    ANNOTATIONS_CSV,
    CALCIFICATION,
    CLASS_TO_LABEL,
    CLASSES,
    IGNORE,
    MASS,
    NONE_FINDING,
)

log = logging.getLogger(__name__)

_UNKNOWN_WORD = "unknown finding word (map it in the site config)"

#: COCO alternative to ``annotations.csv`` in a site folder.
ANNOTATIONS_JSON = "annotations.json"

#: A function mapping a site word to ``mass | calcification | ignore | none``
#: (or ``None`` when the word is unknown).
FindingMapper = Callable[[str], str | None]

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Skip:
    """One row (or reference) not used, or used in part (a clipped box), and why."""

    file: str
    row: int | None
    field: str
    value: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for reports."""
        return asdict(self)

    def message(self) -> str:
        """One line naming file, row, field and value."""
        where = f"{self.file}" + (f" row {self.row}" if self.row is not None else "")
        return f"{where}: {self.field}={self.value!r}: {self.reason}"

    def add_to(self, skips: list[Skip]) -> None:
        """Append to ``skips`` and log :meth:`message` as a warning."""
        skips.append(self)
        log.warning("skipped: %s", self.message())


@dataclass(frozen=True)
class Finding:
    """One annotation row after parsing.

    Attributes:
        kind: ``mass``, ``calcification``, ``ignore`` or ``none``.
        box: ``(xmin, ymin, xmax, ymax)`` in stored pixels, or ``None`` for an
            image-level label (or a ``none`` row).
        row: source row number (1-based, header = row 1) or COCO annotation index.
        word: the word as written in the file.
    """

    kind: str
    box: Box | None
    row: int | None
    word: str


@dataclass
class ImageAnnotations:
    """All rows of one image reference."""

    image: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def normal(self) -> bool:
        """Whether a ``none`` row was given."""
        return any(f.kind == NONE_FINDING for f in self.findings)

    @property
    def weak(self) -> bool:
        """Whether some finding has no box (image-level label)."""
        return any(f.kind != NONE_FINDING and f.box is None for f in self.findings)


@dataclass
class AnnotationSet:
    """Parsed annotations of one file: per image reference, plus skipped rows."""

    source: str
    images: dict[str, ImageAnnotations] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)

    def add(self, image: str, finding: Finding) -> None:
        """Append a finding to ``image``'s list."""
        self.images.setdefault(image, ImageAnnotations(image)).findings.append(finding)

    def skip(self, row: int | None, field_name: str, value: Any, reason: str) -> None:
        """Record and log a skipped row."""
        Skip(self.source, row, field_name, str(value), reason).add_to(self.skipped)


def normalize_ref(ref: str) -> str:
    """Canonical form of an ``image`` reference (backslashes, ``./`` removed)."""
    parts = PurePosixPath(ref.strip().replace("\\", "/")).parts
    return "/".join(x for x in parts if x not in (".", ""))


def _parse_float(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _parse_box(
    coords: Mapping[str, str], aset: AnnotationSet, row: int
) -> tuple[bool, Box | None]:
    """``(ok, box)``; ``box`` None when all four are empty (image-level label)."""
    names = ANNOTATION_COLUMNS[2:]
    raw = {n: (coords.get(n) or "").strip() for n in names}
    filled = [n for n in names if raw[n]]
    if not filled:
        return True, None
    if len(filled) != 4:
        missing = next(n for n in names if not raw[n])
        aset.skip(row, missing, "", "coordinate missing while others are given")
        return False, None
    vals: dict[str, float] = {}
    for n in names:
        v = _parse_float(raw[n])
        if v is None:
            aset.skip(row, n, raw[n], "not a finite number")
            return False, None
        vals[n] = v
    for lo, hi in (("xmin", "xmax"), ("ymin", "ymax")):
        if vals[lo] >= vals[hi]:
            aset.skip(row, lo, raw[lo], f"{lo} >= {hi} ({raw[hi]})")
            return False, None
    return True, (vals["xmin"], vals["ymin"], vals["xmax"], vals["ymax"])


def read_csv_records(
    path: Path,
    columns: Sequence[str],
    *,
    error: type[MammofedError] = MammofedError,
    what: str = "table",
) -> list[tuple[int, dict[Any, Any]]]:
    """Rows of a CSV whose header must hold ``columns``, as ``(row number, row)``.

    Row numbers are as in the file (the header is row 1); header names are
    stripped; a row with more fields than the header keeps them under the key
    ``None`` (``csv.DictReader``). An unreadable file (also a malformed CSV, e.g.
    a field over :func:`csv.field_size_limit`), a missing column or a column
    named twice raises ``error`` naming the file and the header.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {what}: {exc}") from exc
    reader = csv.DictReader(text.splitlines())
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        dup = next((h for i, h in enumerate(header) if h and h in header[:i]), None)
        if dup is not None:
            raise error(
                f"{path}: header {header!r} names column {dup!r} twice "
                "(which one holds the value is ambiguous)"
            )
        missing = [c for c in columns if c not in header]
        if missing:
            raise error(
                f"{path}: header {header!r} lacks column(s) {', '.join(missing)} "
                f"(expected {', '.join(columns)})"
            )
        reader.fieldnames = header
        return list(enumerate(reader, start=2))
    except csv.Error as exc:
        raise error(
            f"{path}: unreadable {what} (CSV line {reader.reader.line_num}): {exc}"
        ) from exc


def read_annotations_csv(path: str | Path, mapper: FindingMapper) -> AnnotationSet:
    """Parse an ``annotations.csv`` (site contract, see module docstring).

    Args:
        path: the CSV file.
        mapper: site word -> kind (e.g. ``SiteConfig.finding_kind``).

    Returns:
        The parsed rows by normalized image reference, plus logged skips.

    Raises:
        AnnotationError: the file cannot be read or lacks required columns.
    """
    p = Path(path)
    aset = AnnotationSet(str(p))
    rows = read_csv_records(
        p, ANNOTATION_COLUMNS, error=AnnotationError, what="annotations"
    )
    dropped: dict[str, list[int]] = {}  # image -> its skipped rows
    for i, rec in rows:
        if rec is None or all(not (v or "").strip() for v in rec.values() if v):
            continue
        if None in rec:
            aset.skip(i, "<row>", rec[None], "more fields than the header")  # type: ignore[index]
            continue
        ref = normalize_ref(rec.get("image") or "")
        if not ref:
            aset.skip(i, "image", rec.get("image") or "", "empty image reference")
            continue
        word = (rec.get("finding") or "").strip()
        kind = mapper(word) if word else None
        if kind is None:
            aset.skip(i, "finding", word, _UNKNOWN_WORD)
            dropped.setdefault(ref, []).append(i)
            continue
        ok, box = _parse_box(rec, aset, i)
        if not ok:
            dropped.setdefault(ref, []).append(i)
            continue
        if kind == NONE_FINDING and box is not None:
            aset.skip(i, "finding", word, "a 'none' row must not carry a box")
            dropped.setdefault(ref, []).append(i)
            continue
        aset.add(ref, Finding(kind, box, i, word))
    for ann in aset.images.values():
        _drop_conflicts(ann, aset.source, aset.skipped)
    _settle_skipped(aset, dropped)
    return aset


def _fmt_box(box: Box) -> str:
    """``xmin, ymin, xmax, ymax`` as short numbers, for messages."""
    return ", ".join(f"{v:g}" for v in box)


def _drop_conflicts(ann: ImageAnnotations, source: str, skips: list[Skip]) -> None:
    """Remove from ``ann`` the findings that would count wrong (logged Skips).

    * an exact repeat of an earlier finding (same kind and box, or both
      without a box): a second ground-truth box of one lesion would count it
      twice; the first is kept;
    * a ``none`` finding beside a lesion (mass or calcification): the labels
      contradict each other; the lesion is kept (a ``none`` row beside a
      lesion is most likely a leftover) and the ``none`` finding skipped.

    Findings made up by this module (words in ``<...>``) are left alone. Each
    :class:`Skip` names ``source``, the row dropped and the row it clashes with.
    """
    first: dict[tuple[str, Box | None], Finding] = {}
    kept: list[Finding] = []
    for f in ann.findings:
        prev = f if f.word.startswith("<") else first.setdefault((f.kind, f.box), f)
        if prev is not f:
            box = "no box" if f.box is None else f"box ({_fmt_box(f.box)})"
            why = (
                f"repeats row {prev.row} (same finding {f.kind!r}, {box}): "
                "duplicate skipped"
            )
            Skip(source, f.row, "image", ann.image, why).add_to(skips)
            continue
        kept.append(f)
    lesion = next((f for f in kept if f.kind in (MASS, CALCIFICATION)), None)
    if lesion is not None and any(f.kind == NONE_FINDING for f in kept):
        for f in kept:
            if f.kind != NONE_FINDING:
                continue
            why = (
                f"'none' contradicts the {lesion.kind} of row {lesion.row} "
                f"({lesion.word!r}) for image {ann.image!r}: the lesion is kept "
                "(a 'none' row beside a lesion is most likely a leftover), this "
                "row skipped"
            )
            Skip(source, f.row, "finding", f.word, why).add_to(skips)
        kept = [f for f in kept if f.kind != NONE_FINDING]
    ann.findings[:] = kept


def _settle_skipped(aset: AnnotationSet, dropped: Mapping[str, list[int]]) -> None:
    """What an image whose rows were partly skipped may still say.

    ``dropped`` maps an image reference to the rows (indices) of it that were
    skipped. A skipped row may have been a lesion, so what is left of the
    image must not claim more than it knows:

    * nothing left, or only ``none`` rows: the image is left **unlabeled**
      (a normal image would teach the lost lesion as background);
    * lesions or ignore regions left: they are kept, and the image is made
      **weakly labeled** (an ``ignore`` finding without a box), so its boxes
      are not used for box supervision, which would learn the lost lesion as
      background.

    Each decision is logged as a :class:`Skip` naming the image and its rows.
    """
    for ref, rows in dropped.items():
        ann = aset.images.get(ref)
        if ann is None or all(f.kind == NONE_FINDING for f in ann.findings):
            aset.images.pop(ref, None)
            said = " and a 'none' row" if ann is not None else ""
            why = (
                f"rows {rows} of this image were skipped{said}: left unlabeled, "
                "not marked normal"
            )
            aset.skip(rows[0], "image", ref, why)
            continue
        why = (
            f"rows {rows} of this image were skipped: its other findings are "
            "kept as a weak label (no box supervision)"
        )
        aset.skip(rows[0], "image", ref, why)
        ann.findings.append(Finding(IGNORE, None, rows[0], "<skipped rows>"))


def _is_id(v: Any) -> TypeGuard[str | int]:
    """Whether ``v`` can be a COCO id: a string or an integer (not a bool)."""
    return isinstance(v, str | int) and not isinstance(v, bool)


def _coco_box(bbox: Any) -> Box | None:
    """``(xmin, ymin, xmax, ymax)`` of a COCO ``[x, y, w, h]``; None if invalid.

    Valid: four numbers (``bool`` is not a number), each and the far corner
    finite as floats (an integer too large for a float is invalid), ``w, h > 0``.
    """
    if not isinstance(bbox, list) or len(bbox) != 4:
        return None
    vals: list[float] = []
    for v in bbox:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return None
        try:
            f = float(v)
        except OverflowError:
            return None
        vals.append(f)
    x, y, w, h = vals
    box = (x, y, x + w, y + h)
    if not (w > 0 and h > 0 and all(math.isfinite(c) for c in (*vals, *box))):
        return None
    return box


def read_coco_json(path: str | Path, mapper: FindingMapper) -> AnnotationSet:
    """Parse COCO-style JSON (see module docstring) into an :class:`AnnotationSet`.

    Raises:
        AnnotationError: unreadable or too deeply nested JSON, missing top-level
            lists, or a category id given twice with different names.
    """
    p = Path(path)
    aset = AnnotationSet(str(p))
    data = read_json_document(p, "COCO JSON", AnnotationError)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{p}: '{key}' must be a list, got {data.get(key)!r}")
    try:
        _parse_coco(data, mapper, aset)
    except RecursionError as exc:
        raise AnnotationError(f"{p}: COCO JSON nested too deeply") from exc
    return aset


def _parse_coco(
    data: dict[str, Any], mapper: FindingMapper, aset: AnnotationSet
) -> None:
    """The body of :func:`read_coco_json`: fills ``aset``."""
    images: dict[str | int, str] = {}
    for i, im in enumerate(data["images"]):
        if (
            not isinstance(im, dict)
            or not _is_id(im.get("id"))
            or not isinstance(im.get("file_name"), str)
            or not im["file_name"].strip()
        ):
            why = "image entry needs 'id' (string or integer) and 'file_name' (text)"
            aset.skip(i, "images", im, why)
            continue
        if im["id"] in images:
            kept = images[im["id"]]
            why = f"image id {im['id']!r} repeated (first entry kept: {kept})"
            aset.skip(i, "images", im, why)
            continue
        images[im["id"]] = normalize_ref(im["file_name"])
    cats: dict[str | int, str] = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_id(c.get("id")) or "name" not in c:
            why = "category needs 'id' (string or integer) and 'name'"
            aset.skip(i, "categories", c, why)
            continue
        name = str(c["name"])
        if cats.get(c["id"], name) != name:
            raise AnnotationError(
                f"{aset.source}: categories[{i}]: category id {c['id']!r} is given "
                f"twice, as {cats[c['id']]!r} and {name!r} (labels would be ambiguous)"
            )
        cats[c["id"]] = name
    annotated: set[str] = set()
    dropped: dict[str, list[int]] = {}  # image -> indices of its skipped annotations
    by_text: dict[str, list[str]] = {}  # str(image id) -> images
    for k, name in images.items():
        by_text.setdefault(str(k), []).append(name)
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            aset.skip(i, "annotations", a, "annotation must be an object")
            continue
        image_id = a.get("image_id")
        ref = images.get(image_id) if _is_id(image_id) else None
        if ref is None:
            aset.skip(i, "image_id", image_id, "unknown image id")
            for near in by_text.get(str(image_id), []):  # "1" for 1: not normal
                dropped.setdefault(near, []).append(i)
            continue
        cat_id = a.get("category_id")
        word = cats.get(cat_id) if _is_id(cat_id) else None
        if word is None:
            aset.skip(i, "category_id", cat_id, "unknown category id")
            dropped.setdefault(ref, []).append(i)
            continue
        kind = mapper(word)
        if kind is None:
            aset.skip(i, "category", word, _UNKNOWN_WORD)
            dropped.setdefault(ref, []).append(i)
            continue
        bbox = a.get("bbox")
        box: Box | None = None
        if bbox is not None and bbox != []:
            box = _coco_box(bbox)
            if box is None:
                why = "bbox must be [x, y, w, h]: finite numbers, w, h > 0"
                aset.skip(i, "bbox", bbox, why)
                dropped.setdefault(ref, []).append(i)
                continue
        if kind == NONE_FINDING and box is not None:
            aset.skip(i, "category", word, "a 'none' annotation must not carry a box")
            dropped.setdefault(ref, []).append(i)
            continue
        aset.add(ref, Finding(kind, box, i, word))
        annotated.add(ref)
    for ref in images.values():
        if ref not in annotated and ref not in dropped:
            aset.add(
                ref, Finding(NONE_FINDING, None, None, "<listed without annotations>")
            )
    for ann in aset.images.values():
        _drop_conflicts(ann, aset.source, aset.skipped)
    _settle_skipped(aset, dropped)


def read_site_annotations(
    site_dir: str | Path, mapper: FindingMapper
) -> AnnotationSet | None:
    """``SITE_DIR/annotations.csv`` if present, else ``annotations.json``, else None."""
    d = Path(site_dir)
    csv_path = d / ANNOTATIONS_CSV
    if csv_path.is_file():
        return read_annotations_csv(csv_path, mapper)
    json_path = d / ANNOTATIONS_JSON
    if json_path.is_file():
        return read_coco_json(json_path, mapper)
    return None


@dataclass(frozen=True)
class ImageTargets:
    """One image's targets, in both spaces.

    Attributes:
        labeled: the image has at least one (valid) annotation row.
        weak: some finding has no box (image-level label); excluded from box
            supervision.
        has_lesion: some mass or calcification finding (box or image-level).
        boxes_stored / boxes: float[N, 4] lesion boxes, stored / model space.
        labels: int[N] indices into :data:`common.keys.CLASSES`.
        ignore_stored / ignore: float[M, 4] ignore regions, stored / model space.
        weak_kinds: kinds given as image-level labels.
    """

    labeled: bool
    weak: bool
    has_lesion: bool
    boxes_stored: list[list[float]]
    boxes: list[list[float]]
    labels: list[int]
    ignore_stored: list[list[float]]
    ignore: list[list[float]]
    weak_kinds: list[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageTargets:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    @classmethod
    def unlabeled(cls) -> ImageTargets:
        """Targets of an image without any annotation row."""
        return cls(False, False, False, [], [], [], [], [], [])


#: A box edge beyond the stored image by at most this many pixels is clipped
#: silently (rounding); more is logged, see :func:`targets_for`.
CLIP_TOLERANCE_PX = 2.0


def _outside_fraction(box: Box, clipped: Sequence[float]) -> float:
    """Share of ``box``'s area outside ``clipped`` (its clip to the image), 0..1."""
    w, h = box[2] - box[0], box[3] - box[1]
    cw, ch = max(0.0, clipped[2] - clipped[0]), max(0.0, clipped[3] - clipped[1])
    # ratios per axis: no overflow to inf * 0 for huge boxes
    return 1.0 - (cw / w) * (ch / h)


def targets_for(
    ann: ImageAnnotations, geometry: Geometry, source: str, skips: list[Skip]
) -> ImageTargets:
    """Map one image's findings to model space with ``geometry``.

    Boxes are clipped to the stored image and then to the model grid; a box that
    lies entirely outside either is skipped (logged, appended to ``skips``).

    Against the stored image: an edge beyond it by at most
    :data:`CLIP_TOLERANCE_PX` is clipped silently (rounding); a box clipped by
    more is kept, clipped, with a logged :class:`Skip`-style warning. A lesion
    box with more than half its area outside is refused as if entirely outside
    (skipped, the lesion kept as an image-level label, so ``weak``); an ignore
    region is only clipped (ignoring its inside part is the safe side).
    """
    rows, cols = geometry.stored_shape
    mh, mw = geometry.model_shape
    boxes_s: list[list[float]] = []
    labels: list[int] = []
    ign_s: list[list[float]] = []
    weak_kinds: list[str] = []
    has_lesion = False
    for f in ann.findings:
        if f.kind in (MASS, CALCIFICATION):
            has_lesion = True
        if f.kind == NONE_FINDING:
            continue
        if f.box is None:
            weak_kinds.append(f.kind)
            continue
        x0, y0, x1, y1 = f.box
        c = [max(0.0, x0), max(0.0, y0), min(float(cols), x1), min(float(rows), y1)]
        empty = c[0] >= c[2] or c[1] >= c[3]
        moved = max(abs(a - b) for a, b in zip(f.box, c, strict=True))
        outside = _outside_fraction(f.box, c)
        big = moved > CLIP_TOLERANCE_PX
        if empty or (big and outside > 0.5 and f.kind != IGNORE):
            why = (
                f"box lies outside the stored image ({cols}x{rows} px)"
                if empty
                else f"{outside:.0%} of the box lies outside the stored image "
                f"({cols}x{rows} px): coordinates look wrong"
            )
            Skip(source, f.row, "box", str(list(f.box)), why).add_to(skips)
            if f.kind != IGNORE:  # a lesion we cannot place: no box supervision
                weak_kinds.append(f.kind)
            continue
        if big:
            why = (
                f"box overhangs the stored image ({cols}x{rows} px) by more than "
                f"{CLIP_TOLERANCE_PX:g} px ({outside:.0%} of its area): kept, "
                f"clipped to {c}"
            )
            Skip(source, f.row, "box", str(list(f.box)), why).add_to(skips)
        if f.kind == IGNORE:
            ign_s.append(c)
        else:
            boxes_s.append(c)
            labels.append(CLASS_TO_LABEL[f.kind])

    def to_model(bs: list[list[float]], lbl: list[int] | None) -> tuple[list, list]:
        if not bs:
            return [], []
        m = geometry.to_model(np.asarray(bs, dtype=np.float64))
        m[:, [0, 2]] = m[:, [0, 2]].clip(0, mw)
        m[:, [1, 3]] = m[:, [1, 3]].clip(0, mh)
        keep_b, keep_s, keep_l = [], [], []
        for j, b in enumerate(m):
            if b[0] >= b[2] or b[1] >= b[3]:
                why = "box lies outside the breast crop (model space)"
                Skip(source, None, "box", str(bs[j]), why).add_to(skips)
                if lbl is not None:
                    weak_kinds.append(CLASSES[lbl[j]])
                continue
            keep_b.append([float(v) for v in b])
            keep_s.append(bs[j])
            if lbl is not None:
                keep_l.append(lbl[j])
        bs[:] = keep_s
        return keep_b, keep_l

    boxes_m, labels = to_model(boxes_s, labels)
    ign_m, _ = to_model(ign_s, None)
    return ImageTargets(
        labeled=bool(ann.findings),
        weak=bool(weak_kinds),
        has_lesion=has_lesion,
        boxes_stored=boxes_s,
        boxes=boxes_m,
        labels=labels,
        ignore_stored=ign_s,
        ignore=ign_m,
        weak_kinds=sorted(set(weak_kinds)),
    )


def match_annotations(
    aset: AnnotationSet | None,
    entries: Iterable[tuple[str, str, str | None, Geometry]],
) -> tuple[dict[str, ImageTargets], list[Skip]]:
    """Attach annotations to ingested images.

    Args:
        aset: parsed annotations (``None``: the site has none; all unlabeled).
        entries: ``(key, source_rel, sop_instance_uid, geometry)`` per cached
            image; ``source_rel`` is the path relative to ``SITE_DIR``.

    Returns:
        ``(targets by key, skips)``; references matching no image are skipped
        with a logged reason naming the row(s); rows naming one image by path
        and by SOPInstanceUID are checked together for repeats and
        contradictions (:func:`_drop_conflicts`).
    """
    entries = list(entries)
    skips: list[Skip] = []
    if aset is None:
        return {k: ImageTargets.unlabeled() for k, _, _, _ in entries}, skips
    by_ref: dict[str, str] = {}
    for key, rel, uid, _ in entries:
        by_ref[normalize_ref(rel)] = key
        if uid:
            by_ref.setdefault(uid.strip(), key)
    per_key: dict[str, ImageAnnotations] = {}
    merged_refs: Counter[str] = Counter()
    for ref, ann in aset.images.items():
        hit = by_ref.get(ref)
        if hit is None:
            rows = [f.row for f in ann.findings if f.row is not None]
            why = f"unknown image (no ingested file or SOPInstanceUID; rows {rows})"
            Skip(aset.source, rows[0] if rows else None, "image", ref, why).add_to(
                skips
            )
            continue
        merged = per_key.setdefault(hit, ImageAnnotations(ref))
        merged.findings.extend(ann.findings)
        merged_refs[hit] += 1
    for key, n in merged_refs.items():
        if n > 1:  # one ref's rows were checked when read
            _drop_conflicts(per_key[key], aset.source, skips)
    out: dict[str, ImageTargets] = {}
    for key, rel, _, geom in entries:
        found = per_key.get(key)
        out[key] = (
            ImageTargets.unlabeled()
            if found is None
            else targets_for(found, geom, f"{aset.source} [{rel}]", skips)
        )
    return out, skips
