"""mini-MIAS -> a site folder in the site contract.

Input: a folder in the mini-MIAS layout, ``png/mdbNNN.png`` (1024 x 1024, 8-bit,
0.2 mm pixels) and ``Info.txt`` (one row per finding: ``id tissue class
[severity x y radius]``; the circle's origin is the **bottom-left** corner, so
``row = H - 1 - y``). This also works on any other folder of that layout (the
held-back women are judged that way).

Output (``OUT_SITE_DIR``):

* ``<id>.png``: byte copies of the images;
* ``images.csv``: ``image, patient_id, laterality, view, spacing_mm``; the
  woman of ids ``2k-1`` and ``2k`` is ``mias-w{k:03d}``; even ids are left
  breasts (``L``), odd ids right (``R``); view ``MLO``; spacing 0.2 mm;
* ``annotations.csv``: the site contract. A circle becomes its bounding box in
  stored pixels (pixel-edge coordinates, origin top-left): the centre pixel
  ``(x, H-1-y)`` has its centre at ``(x + 0.5, H - 1 - y + 0.5)`` and the box is
  that point +- radius, clipped to the image (a clipped circle is logged:
  file, line, circle and the clipped box). A circle whose centre lies
  outside the image, whose radius is not positive or exceeds the image's
  larger side, or a coordinate of more than ``MAX_COORD_DIGITS`` digits, is
  logged (file, line, value) and its coordinates dropped: the row is kept as
  an image-level label (the class still says there is a finding; skipping the
  row would leave the image unlabeled). Classes: CIRC/SPIC/MISC -> mass,
  CALC -> calcification (the circle covers the cluster), ARCH/ASYM -> ignore,
  NORM -> a ``none`` row; abnormal rows without coordinates are kept as
  image-level labels (empty box). With ``keep_words=True`` the MIAS words are
  written instead, for a site config to map;
* ``density.csv``: ``image, density``, the background tissue of each image
  with a table row, as MIAS writes it (``F`` fatty, ``G`` fatty-glandular,
  ``D`` dense-glandular; not mapped to BI-RADS). An image's first row decides;
  a later row of the same image with another tissue is logged and ignored.

A row that repeats an earlier row of the same image (same class, or another
class written as the same finding, and the same circle or both without
coordinates) is skipped with a warning naming both lines: it would be a second
ground-truth box of one lesion. A ``NORM`` row of an image
that also has an abnormal row contradicts it: the abnormal rows are kept (a
``NORM`` row beside a lesion is most likely a leftover) and the ``NORM`` row is
skipped with a warning naming both lines. Both kinds of skip are listed in
:attr:`ImportSummary.table_skipped`.

Malformed table rows are skipped with a warning naming the file, line and
value; images without a table row are copied but get no annotation
(unlabeled); table rows without an image are skipped with a warning. A PNG
that PIL cannot decode is not imported (warning naming it; its table rows are
skipped); the other images are. An output folder that is the source folder or
lies inside it is refused before anything is written.
"""

from __future__ import annotations

import csv
import logging
import re
import shutil
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from common.errors import MammofedError, shown
from common.imaging.image import DENSITY_COLUMNS, DENSITY_CSV
from common.keys import (
    ANNOTATION_COLUMNS,
    ANNOTATIONS_CSV,
    CALCIFICATION,
    IGNORE,
    LEFT,
    MASS,
    NONE_FINDING,
    RIGHT,
    VIEW_MLO,
)

log = logging.getLogger(__name__)

MIAS_SPACING_MM = 0.2
INFO_TXT = "Info.txt"
PNG_DIR = "png"
IMAGES_CSV = "images.csv"
#: MIAS class word -> finding kind of the site contract.
MIAS_CLASSES: dict[str, str] = {
    "CIRC": MASS,
    "SPIC": MASS,
    "MISC": MASS,
    "CALC": CALCIFICATION,
    "ARCH": IGNORE,
    "ASYM": IGNORE,
    "NORM": NONE_FINDING,
}
TISSUES = frozenset({"F", "G", "D"})
SEVERITIES = frozenset({"B", "M"})
_ID = re.compile(r"^mdb(\d{3})$")
#: An ``x``, ``y`` or ``radius`` token (a sign is read, then judged).
_INT = re.compile(r"[+-]?\d+")
#: Longest ``x``, ``y`` or ``radius`` accepted (MIAS images are 1024 pixels).
MAX_COORD_DIGITS = 5
#: What PIL raises on a file it cannot decode.
_PIL_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error,
    Image.DecompressionBombError,
)  # fmt: skip


@dataclass(frozen=True)
class MiasRow:
    """One parsed line of ``Info.txt``.

    ``x, y, radius`` are in MIAS pixels with the origin at the bottom-left;
    ``None`` when the row gives no coordinates.
    """

    image_id: str
    number: int
    tissue: str
    cls: str
    severity: str | None
    x: int | None
    y: int | None
    radius: int | None
    line: int
    #: the line as written (stripped), for messages.
    text: str = ""

    @property
    def kind(self) -> str:
        """Finding kind of the site contract."""
        return MIAS_CLASSES[self.cls]


@dataclass
class MiasTable:
    """Parsed ``Info.txt``: rows kept and lines skipped (line, value, reason)."""

    rows: list[MiasRow] = field(default_factory=list)
    skipped: list[tuple[int, str, str]] = field(default_factory=list)


def woman_id(number: int) -> str:
    """Woman of image ``mdb{number}``: ids ``2k-1`` and ``2k`` are woman ``k``."""
    return f"mias-w{(number + 1) // 2:03d}"


def laterality_of(number: int) -> str:
    """Even ids are left breasts, odd ids right."""
    return LEFT if number % 2 == 0 else RIGHT


def parse_info(path: str | Path) -> MiasTable:
    """Parse ``Info.txt`` tolerantly.

    Rules: the first token must be ``mdbNNN``, the second a tissue letter
    (F/G/D), the third a known class; then an optional severity (B/M) and
    optional ``x y radius`` integers. Another single letter where the severity
    belongs, or another word followed by three integers, is an unknown severity:
    logged and ignored (the site contract has no severity), the coordinates are
    read. Extra text (``*NOTE 3*``) where numbers belong means "no coordinates"
    (logged). A radius that is not positive is logged and the coordinates are
    dropped (the row is kept as an image-level label, as for any circle that
    cannot be placed). Lines that do not start with an id (headers, blank lines)
    are passed over; other malformed lines are skipped with a warning.

    Raises:
        MammofedError: the file cannot be read.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="latin-1").splitlines()
    except OSError as exc:
        raise MammofedError(f"{p}: cannot read: {exc}") from exc
    table = MiasTable()

    def skip(n: int, value: str, reason: str) -> None:
        table.skipped.append((n, value, reason))
        log.warning("%s line %d: %s: %s", p, n, shown(value), reason)

    for n, line in enumerate(lines, start=1):
        tok = line.split()
        if not tok or not _ID.match(tok[0]):
            if tok and tok[0].lower().startswith("mdb"):
                skip(n, tok[0], "malformed image id (expected mdbNNN)")
            continue
        if len(tok) < 3:
            skip(n, line.strip(), "too few fields (need id, tissue, class)")
            continue
        number = int(_ID.match(tok[0]).group(1))  # type: ignore[union-attr]
        tissue, cls = tok[1].upper(), tok[2].upper()
        if tissue not in TISSUES:
            skip(n, tok[1], "unknown background tissue (expected F, G or D)")
            continue
        if cls not in MIAS_CLASSES:
            skip(n, tok[2], f"unknown class (expected one of {sorted(MIAS_CLASSES)})")
            continue
        rest = tok[3:]
        severity: str | None = None
        if rest and rest[0].upper() in SEVERITIES:
            severity = rest[0].upper()
            rest = rest[1:]
        elif rest and _unknown_severity(rest):
            log.warning(
                "%s line %d: unknown severity %s (expected B or M): ignored",
                p, n, shown(rest[0]),
            )  # fmt: skip
            rest = rest[1:]
        x = y = r = None
        numeric = len(rest) >= 3 and all(_INT.fullmatch(t) for t in rest[:3])
        too_long = (
            [t for t in rest[:3] if len(t.lstrip("+-")) > MAX_COORD_DIGITS]
            if numeric
            else []
        )
        if numeric and not too_long:
            x, y, r = (int(t) for t in rest[:3])
            if len(rest) > 3:
                log.warning(
                    "%s line %d: extra fields ignored: %s",
                    p,
                    n,
                    shown(" ".join(rest[3:])),
                )
        elif too_long:
            log.warning(
                "%s line %d: coordinate %s has more than %d digits; coordinates "
                "dropped, kept as an image-level label",
                p, n, shown(too_long[0]), MAX_COORD_DIGITS,
            )  # fmt: skip
        elif rest:
            log.warning(
                "%s line %d: %s are not coordinates; kept as an image-level label",
                p, n, shown(" ".join(rest)),
            )  # fmt: skip
        if cls == "NORM" and x is not None:
            skip(n, line.strip(), "NORM row with coordinates")
            continue
        if r is not None and r <= 0:
            log.warning(
                "%s line %d: radius %d is not positive; coordinates dropped, kept "
                "as an image-level label",
                p, n, r,
            )  # fmt: skip
            x = y = r = None
        table.rows.append(
            MiasRow(tok[0], number, tissue, cls, severity, x, y, r, n, line.strip())
        )
    return table


def _unknown_severity(rest: list[str]) -> bool:
    """Whether ``rest[0]`` stands where a severity belongs but is none.

    A single letter, or any word but an integer followed by three integers.
    """
    head = rest[0]
    if _INT.fullmatch(head):
        return False
    if len(head) == 1 and head.isalpha():
        return True
    return len(rest) == 4 and all(_INT.fullmatch(t) for t in rest[1:])


def _circle_bounds(
    x: int, y: int, radius: int, height: int
) -> tuple[float, float, float, float]:
    """Unclipped stored-space box of a MIAS circle (see :func:`circle_box`)."""
    cx, cy = x + 0.5, (height - 1 - y) + 0.5
    return (cx - radius, cy - radius, cx + radius, cy + radius)


def circle_box(
    x: int, y: int, radius: int, size: tuple[int, int]
) -> tuple[float, float, float, float] | None:
    """Stored-space box (origin top-left) of a MIAS circle (origin bottom-left).

    Args:
        x: circle centre column (MIAS pixels).
        y: circle centre row counted from the bottom (origin bottom-left).
        radius: circle radius in pixels.
        size: ``(width, height)`` of the image.

    Returns:
        ``(xmin, ymin, xmax, ymax)`` clipped to the image, or ``None`` when the
        centre lies outside the image or the radius exceeds its larger side.
    """
    w, h = size
    if not (0 <= x < w and 0 <= y < h) or radius > max(w, h):
        return None
    x0, y0, x1, y1 = _circle_bounds(x, y, radius, h)
    box = (max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))
    if box[0] >= box[2] or box[1] >= box[3]:
        return None
    return box


@dataclass
class ImportSummary:
    """What :func:`import_mias` wrote."""

    out_dir: Path
    images: int = 0
    annotation_rows: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    densities: Counter[str] = field(default_factory=Counter)
    #: ``(line, value, reason)`` of the table lines not written: malformed
    #: (:func:`parse_info`), repeated or contradicted rows (module docstring).
    table_skipped: list[tuple[int, str, str]] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    unlisted_images: list[str] = field(default_factory=list)
    #: ids of PNGs PIL could not decode (not imported).
    unreadable_images: list[str] = field(default_factory=list)


def import_mias(
    src: str | Path, out_dir: str | Path, *, keep_words: bool = False
) -> ImportSummary:
    """Convert a mini-MIAS-layout folder into a site folder (module docstring).

    Args:
        src: folder holding ``Info.txt`` and ``png/`` (``png`` may also be
            missing when the images lie beside ``Info.txt``).
        out_dir: the site folder to write (created; existing files replaced).
        keep_words: write MIAS class words instead of mapped findings.

    Returns:
        Counts of images, annotation rows per finding and skipped rows.

    Raises:
        MammofedError: no ``Info.txt``, no images, or ``out_dir`` is ``src`` or
            inside it (refused before anything is written).
    """
    src_p, out = Path(src), Path(out_dir)
    info = src_p / INFO_TXT
    if not info.is_file():
        raise MammofedError(f"{src_p}: no {INFO_TXT} (not a mini-MIAS folder)")
    src_r, out_r = src_p.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise MammofedError(
            f"{out}: output folder is the source folder {src_p} or inside it "
            "(would overwrite or mix with the inputs); choose one outside it"
        )
    png_dir = src_p / PNG_DIR if (src_p / PNG_DIR).is_dir() else src_p
    pngs = {p.stem: p for p in sorted(png_dir.glob("mdb*.png"))}
    if not pngs:
        raise MammofedError(f"{png_dir}: no mdbNNN.png images")
    table = parse_info(info)
    out.mkdir(parents=True, exist_ok=True)
    summary = ImportSummary(out, table_skipped=list(table.skipped))
    sizes: dict[str, tuple[int, int]] = {}
    with open(out / IMAGES_CSV, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "patient_id", "laterality", "view", "spacing_mm"])
        for stem, p in pngs.items():
            m = _ID.match(stem)
            if m is None:
                log.warning("%s: not an mdbNNN name, not imported", p)
                continue
            number = int(m.group(1))
            try:
                with Image.open(p) as im:
                    im.load()
                    size = im.size
            except _PIL_ERRORS as exc:
                summary.unreadable_images.append(stem)
                log.warning("%s: cannot decode the PNG, not imported: %s", p, exc)
                continue
            sizes[stem] = size
            shutil.copyfile(p, out / p.name)
            w.writerow(
                [p.name, woman_id(number), laterality_of(number), VIEW_MLO,
                 MIAS_SPACING_MM]
            )  # fmt: skip
            summary.images += 1
    listed = set()
    tissue: dict[str, MiasRow] = {}
    #: image -> its first abnormal (non-NORM) row: a NORM row beside it is skipped
    abnormal: dict[str, MiasRow] = {}
    for row in table.rows:
        if row.cls != "NORM":
            abnormal.setdefault(row.image_id, row)
    #: (image, word written, circle) -> the first row that wrote it
    written: dict[tuple[str, str, int | None, int | None, int | None], MiasRow] = {}

    def skip_row(row: MiasRow, reason: str) -> None:
        summary.table_skipped.append((row.line, row.text, reason))
        log.warning("%s line %d: %s", info, row.line, reason)

    with open(out / ANNOTATIONS_CSV, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(ANNOTATION_COLUMNS)
        for row in table.rows:
            if row.image_id in summary.unreadable_images:
                log.warning(
                    "%s line %d: image %s.png could not be decoded; row skipped",
                    info, row.line, row.image_id,
                )  # fmt: skip
                continue
            if row.image_id not in sizes:
                summary.missing_images.append(row.image_id)
                log.warning(
                    "%s line %d: image %s.png not found in %s; row skipped",
                    info, row.line, row.image_id, png_dir,
                )  # fmt: skip
                continue
            listed.add(row.image_id)
            first = tissue.setdefault(row.image_id, row)
            if first.tissue != row.tissue:
                log.warning(
                    "%s line %d: tissue %r of %s differs from %r on line %d; "
                    "the first is written to %s",
                    info, row.line, row.tissue, row.image_id, first.tissue,
                    first.line, DENSITY_CSV,
                )  # fmt: skip
            word = row.cls if keep_words else row.kind
            lesion = abnormal.get(row.image_id)
            if row.cls == "NORM" and lesion is not None:
                skip_row(
                    row,
                    f"{row.image_id} is NORM here but line {lesion.line} gives "
                    f"{lesion.cls} ({shown(lesion.text)}): contradictory labels; "
                    "the finding is kept (a NORM row beside it is most likely a "
                    "leftover), this NORM row skipped",
                )
                continue
            dup_key = (row.image_id, word, row.x, row.y, row.radius)
            first_row = written.setdefault(dup_key, row)
            if first_row is not row:
                noun, detail = "NORM row", ""
                if row.cls != "NORM":
                    lesion_kind = row.kind in (MASS, CALCIFICATION)
                    noun = "lesion" if lesion_kind else "finding"
                    if row.x is None:
                        detail = " (same class, no coordinates)"
                    elif first_row.cls == row.cls:
                        detail = " (same class and circle)"
                    else:
                        detail = f" (same circle; {first_row.cls} there, both {word})"
                skip_row(
                    row,
                    f"{row.image_id} repeats the {noun} of line {first_row.line}"
                    f"{detail}: duplicate skipped",
                )
                continue
            coords: list[str] = ["", "", "", ""]
            if row.x is not None and row.y is not None and row.radius is not None:
                box = circle_box(row.x, row.y, row.radius, sizes[row.image_id])
                if box is None:
                    log.warning(
                        "%s line %d: circle (%d, %d, r=%d) does not fit the %dx%d "
                        "image (centre outside or radius larger than the image); "
                        "coordinates dropped, kept as an image-level label",
                        info, row.line, row.x, row.y, row.radius,
                        *sizes[row.image_id],
                    )  # fmt: skip
                else:
                    coords = [f"{v:g}" for v in box]
                    full = _circle_bounds(
                        row.x, row.y, row.radius, sizes[row.image_id][1]
                    )
                    if box != full:
                        log.warning(
                            "%s line %d: circle (%d, %d, r=%d) extends beyond the "
                            "%dx%d image; box clipped to (%s)",
                            info, row.line, row.x, row.y, row.radius,
                            *sizes[row.image_id], ", ".join(coords),
                        )  # fmt: skip
            w.writerow([f"{row.image_id}.png", word, *coords])
            summary.annotation_rows += 1
            summary.kinds[row.kind] += 1
    with open(out / DENSITY_CSV, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(DENSITY_COLUMNS)
        for image_id, row in sorted(tissue.items()):
            w.writerow([f"{image_id}.png", row.tissue])
            summary.densities[row.tissue] += 1
    summary.unlisted_images = sorted(set(sizes) - listed)
    for stem in summary.unlisted_images:
        log.warning("%s.png has no row in %s: imported unlabeled", stem, info)
    log.info(
        "imported %d images into %s: %d annotation rows (%s); tissue %s; %d table "
        "lines skipped",
        summary.images, out, summary.annotation_rows,
        ", ".join(f"{k}: {v}" for k, v in sorted(summary.kinds.items())),
        ", ".join(f"{k}: {v}" for k, v in sorted(summary.densities.items())),
        len(summary.table_skipped),
    )  # fmt: skip
    return summary
