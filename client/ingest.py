"""Site ingest: walk ``SITE_DIR``, decode every image once, fill the site cache.

What :func:`ingest_site` does, in order:

1. reads ``SITE_DIR/images.csv`` (research images: ``image, patient_id,
   laterality, view, spacing_mm``), ``SITE_DIR/split.csv`` (``patient_id,
   split``) and ``SITE_DIR/density.csv`` (any image: ``image, density``),
   skipping broken rows with a logged reason;
2. walks the tree; DICOM files (known suffix, or recognised by content) and
   PNG/TIFF files are candidates, everything else (``annotations.csv``,
   ``split.csv``, ``images.csv``, text, licences...) is passed over quietly;
3. per candidate, reuses the cache entry when the file's size and mtime (and its
   sidecar options) are unchanged, or when its content key is already cached;
   otherwise decodes it with :func:`common.imaging.image_io.read_any` in a decode
   process (:func:`decode_isolated`; ``workers`` of them, never in the ingest
   process itself) and writes ``images/<key>.npz|json``; the header is checked
   against the pixel budget ``cfg.max_pixels`` before any pixel is decoded;
   files refused before with the same content (and budget) are not decoded
   again (their reasons are kept in ``refused.json``; ``force=True`` retries
   everything);
4. drops entries whose source disappeared or changed;
5. resolves duplicates (:func:`resolve_duplicates`: one image, one patient,
   one set of labels);
6. sets each entry's breast density (``meta.density``) from ``density.csv``
   (:func:`apply_density`: JSON only, no pixels; no row: unknown) and rebuilds
   ``annotations.json`` (cheap: from the annotation file and the cached
   geometries, no pixels), ``split.json``, ``manifest.csv``,
   ``ingest_report.json`` and ``resolved_config.yaml``.

One bad file never aborts the walk: it is listed under ``skipped`` with its
reason. A decoder that raises anything (a native ``PanicException`` is a
``BaseException``), runs out of memory, crashes its process (segfault, abort,
killed) or exceeds ``cfg.decode_timeout_s`` costs that file only. Once the
walk has started, the manifest and the report are written even if the run
stops on an unexpected error (``"status": "interrupted"`` in the report, the
files verified so far in the manifest).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import resource
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from common.config import write_resolved
from common.config.site import SiteConfig
from common.errors import MammofedError, RefusedImage, one_line
from common.imaging.annotations import (
    ANNOTATIONS_JSON,
    Skip,
    match_annotations,
    normalize_ref,
    read_csv_records,
    read_site_annotations,
)
from common.imaging.cache import (
    SITE_ROOT_TXT,
    SPLITS,
    CacheEntry,
    SiteCache,
    atomic_write_text,
    manifest_row,
)
from common.imaging.image import (
    DENSITY_COLUMNS,
    DENSITY_CSV,
    DENSITY_VALUES,
    MAX_SPACING_MM,
    MIN_SPACING_MM,
    MammoImage,
)
from common.imaging.research_image import RESEARCH_SUFFIXES
from common.keys import (
    ANNOTATIONS_CSV,
    LEFT,
    RESOLVED_CONFIG_YAML,
    RIGHT,
    SPLIT_CSV,
)
from common.progress import Eta

log = logging.getLogger(__name__)

#: Sidecar table of research images in ``SITE_DIR``.
IMAGES_CSV = "images.csv"
SPLIT_COLUMNS: tuple[str, ...] = ("patient_id", "split")
#: Remembered refusals (key -> {"file", "reason"}) so unchanged bad files are
#: not decoded again.
REFUSED_JSON = "refused.json"

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
#: Suffixes never looked at (documentation, tables, configs...).
NON_IMAGE_SUFFIXES = frozenset(
    {
        ".csv", ".json", ".txt", ".md", ".rst", ".yaml", ".yml", ".xml",
        ".html", ".pdf", ".py", ".zip", ".gz", ".tmp", ".npz", ".log",
    }
)  # fmt: skip
SITE_FILES = frozenset(
    {ANNOTATIONS_CSV, ANNOTATIONS_JSON, SPLIT_CSV, IMAGES_CSV, DENSITY_CSV}
)

#: ``reader(path, *, working_spacing_mm, default_spacing_mm, spacing_mm,
#: laterality, view, patient_id, max_pixels) -> MammoImage``; runs in a decode
#: process, so it must be picklable (a module-level function).
Reader = Callable[..., MammoImage]
#: ``status`` of ``ingest_report.json``: the walk finished, or stopped on an
#: unexpected error (the manifest then lists the files verified so far).
STATUS_COMPLETE = "complete"
STATUS_INTERRUPTED = "interrupted"
#: Seconds a decode process gets to exit after being asked, before it is killed.
STOP_GRACE_S = 5.0


#: What a research image without a patient id becomes (``images.csv``).
_OWN_PATIENT = (
    "row kept, the image is its own patient (the same woman's other images "
    "may land on the other side of a train/test split)"
)


@dataclass(frozen=True)
class SidecarRow:
    """One row of ``images.csv`` (research images)."""

    patient_id: str | None
    laterality: str | None
    view: str | None
    spacing_mm: float | None

    def read_options(self) -> dict[str, Any]:
        """The reader's keyword options this row gives (``None``: not given)."""
        return {
            "spacing_mm": self.spacing_mm,
            "laterality": self.laterality,
            "view": self.view,
            "patient_id": self.patient_id,
        }


class _Table:
    """The stripped rows of a site CSV table, and the rows skipped (logged)."""

    def __init__(self, path: str | Path, columns: Sequence[str]) -> None:
        self.file = str(Path(path))
        self.skips: list[Skip] = []
        self.rows = [
            (i, {k: (v or "").strip() for k, v in rec.items() if isinstance(k, str)})
            for i, rec in read_csv_records(Path(path), columns)
        ]

    def skip(self, row: int, fld: str, value: Any, why: str) -> None:
        Skip(self.file, row, fld, str(value), why).add_to(self.skips)


def read_images_csv(path: str | Path) -> tuple[dict[str, SidecarRow], list[Skip]]:
    """Parse the research-image sidecar; bad rows are skipped with a reason.

    ``patient_id`` groups a woman's images for the train/test split. A row
    without one (empty cell, or no such column) is kept, its image made its own
    patient, with a logged :class:`Skip` naming the file, row and field (once
    for a missing column): that image and the same woman's other views and
    breast could land on opposite sides of a split.

    Returns:
        ``({normalized relative path: row}, skips)``.

    Raises:
        MammofedError: unreadable file or missing columns.
    """
    table = _Table(path, ("image",))
    skip = table.skip
    if any("density" in rec for _, rec in table.rows[:1]):
        skip(1, "density", "(column)", f"not read here: breast density goes in "
             f"{DENSITY_CSV} (image,density), for any image format")  # fmt: skip
    has_pid = not table.rows or "patient_id" in table.rows[0][1]
    if not has_pid:
        skip(1, "patient_id", "(column)", f"missing: {_OWN_PATIENT}")
    out: dict[str, SidecarRow] = {}
    for i, rec in table.rows:
        ref = normalize_ref(rec.get("image", ""))
        if not ref:
            skip(i, "image", rec.get("image", ""), "empty image path")
            continue
        lat = rec.get("laterality", "").upper() or None
        if lat is not None and lat not in (LEFT, RIGHT):
            skip(i, "laterality", lat, "must be L, R or empty")
            continue
        spacing: float | None = None
        raw = rec.get("spacing_mm", "")
        if raw:
            try:
                spacing = float(raw)
            except ValueError:
                spacing = math.nan
            if not (
                math.isfinite(spacing) and MIN_SPACING_MM <= spacing <= MAX_SPACING_MM
            ):
                skip(
                    i,
                    "spacing_mm",
                    raw,
                    f"must be a number in [{MIN_SPACING_MM}, {MAX_SPACING_MM}] "
                    "(mm per pixel of a mammogram)",
                )
                continue
        if ref in out:
            skip(i, "image", ref, "duplicate row (first one kept)")
            continue
        if has_pid and not rec.get("patient_id"):
            skip(i, "patient_id", "", f"empty: {_OWN_PATIENT}")
        out[ref] = SidecarRow(
            patient_id=rec.get("patient_id") or None,
            laterality=lat,
            view=rec.get("view", "").upper() or None,
            spacing_mm=spacing,
        )
    return out, table.skips


@dataclass(frozen=True)
class DensityRow:
    """One usable row of ``density.csv``: its row number and density as given."""

    row: int
    density: str


def read_density_csv(path: str | Path) -> tuple[dict[str, DensityRow], list[Skip]]:
    """Parse ``density.csv`` (``image, density``); bad rows are skipped with a reason.

    ``image`` is a path relative to ``SITE_DIR`` or a SOPInstanceUID (as in
    the annotation file); ``density`` one of
    :data:`common.imaging.image.DENSITY_VALUES` as written (BI-RADS ``a``-``d``
    or MIAS ``F``/``G``/``D``; case matters). An empty or other value, an empty
    image, or a second row for the same image is skipped (logged).

    Returns:
        ``({normalized reference: row}, skips)``.

    Raises:
        MammofedError: unreadable file or missing columns.
    """
    table = _Table(path, DENSITY_COLUMNS)
    skip = table.skip
    out: dict[str, DensityRow] = {}
    for i, rec in table.rows:
        ref = normalize_ref(rec.get("image", ""))
        value = rec.get("density", "")
        if not ref:
            skip(i, "image", rec.get("image", ""), "empty image path")
        elif value not in DENSITY_VALUES:
            skip(i, "density", value, "must be a, b, c, d (BI-RADS) or F, G, D "
                 "(MIAS), as written (case matters): image ingested, density "
                 "unknown")  # fmt: skip
        elif ref in out:
            skip(i, "image", ref, f"second row (row {out[ref].row} kept)")
        else:
            out[ref] = DensityRow(i, value)
    return out, table.skips


def apply_density(
    cache: SiteCache,
    entries: Iterable[CacheEntry],
    table: dict[str, DensityRow] | None,
    source: str = DENSITY_CSV,
) -> tuple[list[CacheEntry], list[Skip]]:
    """Give every entry the density of its ``density.csv`` row (``None``: no row).

    A row matches an entry by path relative to ``SITE_DIR`` or by
    SOPInstanceUID. Changed entries are saved (JSON only). Rows that match no
    entry, or an entry another row already gave a density, are skipped (file
    ``source``, row, value, reason; logged). ``table`` ``None`` (the site has
    no ``density.csv``) clears every density.

    Returns:
        ``(entries in the given order, skips)``.
    """
    entries = list(entries)
    skips: list[Skip] = []
    by_ref: dict[str, str] = {}
    for e in entries:
        by_ref[normalize_ref(e.source)] = e.key
        uid = (e.meta.sop_instance_uid or "").strip()
        if uid:
            by_ref.setdefault(uid, e.key)
    per_key: dict[str, DensityRow] = {}
    for ref, row in sorted((table or {}).items(), key=lambda t: t[1].row):
        key = by_ref.get(ref)
        if key is None:
            why = "no ingested image has this path or SOPInstanceUID: row not used"
            Skip(source, row.row, "image", ref, why).add_to(skips)
        elif key in per_key:
            why = f"same image as row {per_key[key].row} (that row kept)"
            Skip(source, row.row, "image", ref, why).add_to(skips)
        else:
            per_key[key] = row
    out = [
        cache.with_density(e, per_key[e.key].density if e.key in per_key else None)
        for e in entries
    ]
    return out, skips


def read_split_csv(path: str | Path) -> tuple[dict[str, str], list[Skip]]:
    """Parse ``split.csv`` (``patient_id, split`` in ``train|test``).

    Raises:
        MammofedError: unreadable file or missing columns.
    """
    table = _Table(path, SPLIT_COLUMNS)
    skip = table.skip
    out: dict[str, str] = {}
    for i, rec in table.rows:
        pid, split = rec.get("patient_id", ""), rec.get("split", "").lower()
        if not pid:
            skip(i, "patient_id", pid, "empty patient id")
        elif split not in SPLITS:
            skip(i, "split", rec.get("split", ""), "must be train or test")
        elif pid in out and out[pid] != split:
            skip(i, "split", split, f"conflicts with earlier {out[pid]!r}")
        else:
            out[pid] = split
    return out, table.skips


def _is_dicom(path: Path) -> bool:
    from common.imaging.dicom import is_dicom  # deferred: its imports take seconds

    return is_dicom(path)


def find_candidates(site_dir: str | Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """Image files under ``site_dir`` (sorted), passing over non-image files quietly.

    Hidden files/folders and anything under ``exclude`` (e.g. a cache folder
    inside the site folder) are not visited. An entry that is not a regular
    file (a broken link, a FIFO, a socket, a device) is passed over with a
    warning naming it: it may have been an image, and reading a FIFO would
    block.
    """
    root = Path(site_dir)
    excl = [Path(e).resolve() for e in exclude]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(
            n
            for n in dirnames
            if not n.startswith(".") and (d / n).resolve() not in excl
        )
        for name in sorted(filenames):
            p = d / name
            if name.startswith("."):
                continue
            if not p.is_file():
                what = (
                    "a broken link"
                    if p.is_symlink()
                    else "not a regular file (a FIFO, socket or device)"
                )
                log.warning("%s: %s: skipped", p, what)
                continue
            if d == root and name in SITE_FILES:
                continue
            suffix = p.suffix.lower()
            if suffix in DICOM_SUFFIXES or suffix in RESEARCH_SUFFIXES:
                found.append(p)
            elif suffix not in NON_IMAGE_SUFFIXES and _is_dicom(p):
                found.append(p)
            else:
                log.debug("not an image, passed over: %s", p)
    return found


@dataclass(frozen=True)
class _Job:
    path: str
    rel: str
    key: str
    size: int
    mtime_ns: int
    options: dict[str, Any]
    working_spacing_mm: float
    pixel_dtype: str
    cache_dir: str
    max_pixels: int | None
    specks: bool = False


def _failed(
    job: _Job, reason: str, *, transient: bool = False, fatal: bool = False
) -> dict[str, Any]:
    """The outcome of a file that was not cached (``transient``: try it next run)."""
    return {"rel": job.rel, "key": job.key, "ok": False, "reason": reason,
            "transient": transient, "fatal": fatal}  # fmt: skip


def _run_job(job: _Job, reader: Reader | None) -> dict[str, Any]:
    """Decode one file and write its entry; never raises (returns the outcome).

    Runs in a decode process. ``"fatal": True`` in the outcome asks that process
    to exit after reporting: after a ``MemoryError`` or a ``BaseException``
    from native code (e.g. pyo3's ``PanicException``) its state is not trusted.
    """
    if reader is None:
        from common.imaging.image_io import read_any

        reader = read_any
    t0 = time.perf_counter()
    try:
        # specks are a product of the pixels, not a reading option: not in the key
        options: dict[str, Any] = {**job.options}
        if job.specks:
            options["specks"] = True
        img = reader(
            job.path,
            working_spacing_mm=job.working_spacing_mm,
            max_pixels=job.max_pixels,
            **options,
        )
        entry = SiteCache(job.cache_dir).write(
            job.key,
            img,
            source=job.rel,
            size=job.size,
            mtime_ns=job.mtime_ns,
            working_spacing_mm=job.working_spacing_mm,
            pixel_dtype=job.pixel_dtype,
            options=job.options,
        )
    except RefusedImage as exc:
        return _failed(job, exc.reason)
    except MemoryError:
        reason = "out of memory while decoding (MemoryError)"
        return _failed(job, reason, transient=True, fatal=True)
    except Exception as exc:  # noqa: BLE001 - one bad file must not abort the walk
        reason = f"unexpected {one_line(exc)}"
        return _failed(job, reason, transient=True)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - native aborts (PanicException)
        reason = f"decoder aborted: {one_line(exc)}"
        return _failed(job, reason, fatal=True)
    return {
        "rel": job.rel,
        "key": job.key,
        "ok": True,
        "entry": entry.to_dict(),
        "seconds": time.perf_counter() - t0,
    }


@dataclass
class IngestResult:
    """Outcome of one ingest run.

    Attributes:
        entries: cache entries in the manifest (one per ingested image).
        new: keys decoded in this run.
        reused: keys taken from the cache unchanged.
        removed: keys dropped (source gone or changed).
        skipped: ``{"file", "reason"}`` per file not ingested (duplicates
            refused or set aside included).
        annotation_skips: annotation rows not used (file, row, field, value, why).
        report_path, manifest_path: files written.
        seconds: wall time of the run.
        status: :data:`STATUS_COMPLETE`, or :data:`STATUS_INTERRUPTED` when an
            unexpected error stopped the walk (``error`` says which).
        error: ``"Type: first line"`` of that error, else ``None``.
        decode_peak_rss_mb: highest peak resident memory reported by a decode
            process that finished its file (``None`` when nothing was decoded).
    """

    entries: list[CacheEntry] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    annotation_skips: list[Skip] = field(default_factory=list)
    report_path: Path | None = None
    manifest_path: Path | None = None
    seconds: float = 0.0
    status: str = STATUS_COMPLETE
    error: str | None = None
    decode_peak_rss_mb: float | None = None


def _options_for(
    p: Path, rel: str, cfg: SiteConfig, sidecar: dict[str, SidecarRow]
) -> dict[str, Any]:
    """Reader keyword options for one file (part of its cache key)."""
    opts: dict[str, Any] = {"default_spacing_mm": cfg.default_spacing_mm}
    if p.suffix.lower() in RESEARCH_SUFFIXES:
        row = sidecar.get(rel)
        if row is not None:
            opts.update(row.read_options())
    return opts


@dataclass
class _Run:
    """Mutable state of one ingest run (what ``_finish`` writes out)."""

    site: Path
    cache: SiteCache
    cfg: SiteConfig
    result: IngestResult
    t_start: float
    split: dict[str, str] | None = None
    density: dict[str, DensityRow] | None = None
    annotations: Any = None
    table_skips: list[Skip] = field(default_factory=list)
    keep: dict[str, CacheEntry] = field(default_factory=dict)
    refused: dict[str, dict[str, Any]] = field(default_factory=dict)
    walked: bool = False


def _check_site_root(cache: SiteCache, site: Path) -> None:
    """Refuse to fill a cache that mirrors another site folder; else record ``site``.

    A whole walk drops every entry whose file is not in the folder walked,
    so ingesting another folder into a site's cache (a DICOM node's
    ``data_dir`` after a manual ingest of some other tree, say) would delete
    every labeled image of the first. A cache written before the record
    existed adopts the first folder ingested into it.
    """
    recorded = cache.read_site_root()
    here = site.resolve()
    held = sum(1 for _ in cache.keys())  # one listing of the cache
    if held and next(site.iterdir(), None) is None:
        # an unmounted share reads as an empty folder: a walk of it would
        # drop every entry
        raise MammofedError(
            f"{site} is empty but the cache {cache.root} holds images: nothing "
            "ingested, nothing removed (is the folder mounted? delete the cache "
            "to empty it on purpose)"
        )
    if held and recorded is not None and recorded != here:
        raise MammofedError(
            f"{cache.root} mirrors site folder {recorded} ({held} images; "
            f"{SITE_ROOT_TXT}); ingesting {here} into it would remove them. "
            "Ingest into another cache, or delete the cache (or its "
            f"{SITE_ROOT_TXT}) to let {here} replace it"
        )
    if recorded != here:
        cache.write_site_root(here)


def ingest_site(
    site_dir: str | Path,
    cache_dir: str | Path,
    cfg: SiteConfig | None = None,
    *,
    workers: int | None = None,
    reader: Reader | None = None,
    force: bool = False,
) -> IngestResult:
    """Ingest ``site_dir`` into ``cache_dir`` (see the module docstring).

    Args:
        site_dir: the site's image tree (``SITE_DIR``).
        cache_dir: the cache folder (created if needed; may lie inside
            ``site_dir``, it is then not walked).
        cfg: site config (defaults when ``None``).
        workers: decode processes (``None``: ``cfg.workers``).
        reader: image reader (default :func:`common.imaging.image_io.read_any`); it
            runs in the decode processes, so it must be a module-level function.
        force: decode every file again, ignoring cached entries and refusals.

    Returns:
        An :class:`IngestResult`; ``entries`` empty means nothing could be ingested.

    Raises:
        MammofedError: ``site_dir`` is not a folder, or a site table
            (``images.csv``, ``split.csv``, ``density.csv``, the annotation
            file) is unreadable
            as a whole (the report then says ``"failed"``; the previous
            manifest is left as it was).
        BaseException: whatever stopped the walk (``KeyboardInterrupt``...),
            after the manifest and the report of the partial run are written.
    """
    t_start = time.perf_counter()
    cfg = cfg or SiteConfig()
    nworkers = int(workers if workers is not None else cfg.workers)
    if nworkers < 1:
        raise MammofedError(f"workers must be >= 1, got {nworkers}")
    site = Path(site_dir)
    if not site.is_dir():
        raise MammofedError(f"{site}: SITE_DIR is not a folder")
    cache = SiteCache(cache_dir)
    cache.root.mkdir(parents=True, exist_ok=True)
    _check_site_root(cache, site)  # before anything is read or written
    run = _Run(site, cache, cfg, IngestResult(), t_start)

    try:
        sidecar: dict[str, SidecarRow] = {}
        if (site / IMAGES_CSV).is_file():
            sidecar, sk = read_images_csv(site / IMAGES_CSV)
            run.table_skips += sk
        if (site / SPLIT_CSV).is_file():
            run.split, sk = read_split_csv(site / SPLIT_CSV)
            run.table_skips += sk
        if (site / DENSITY_CSV).is_file():
            run.density, sk = read_density_csv(site / DENSITY_CSV)
            run.table_skips += sk
        run.annotations = read_site_annotations(site, cfg.finding_kind)
    except MammofedError as exc:
        run.result.status, run.result.error = "failed", one_line(exc)
        run.result.seconds = time.perf_counter() - t_start
        run.result.report_path = cache.write_report(
            {"site": cfg.name, "site_dir": str(site), "status": "failed",
             "error": run.result.error}
        )  # fmt: skip
        raise

    try:
        _walk(run, sidecar, nworkers, reader, force)
        run.walked = True
    except BaseException as exc:
        run.result.status, run.result.error = STATUS_INTERRUPTED, one_line(exc)
        log.error("ingest stopped by %s: writing the partial results", run.result.error)
        try:
            _finish(run)
        except Exception:  # noqa: BLE001 - the original error is the one to raise
            log.exception("could not write the partial ingest results")
        raise
    _finish(run)
    return run.result


def _walk(
    run: _Run,
    sidecar: dict[str, SidecarRow],
    nworkers: int,
    reader: Reader | None,
    force: bool,
) -> None:
    """Plan (reuse, known refusals, jobs) and decode; fills ``run``."""
    site, cache, cfg, result = run.site, run.cache, run.cfg, run.result
    # --- what is cached already -------------------------------------------------
    old: dict[str, CacheEntry] = {}
    by_source: dict[str, CacheEntry] = {}
    for e in cache.iter_entries():
        if (
            e.working_spacing_mm == cfg.working_spacing_mm
            and cache.has(e.key)
            # stored as the site now asks (pixel_dtype); else decoded again.
            # Entries written before the field existed: read from the header
            and (e.pixel_dtype or cache.stored_dtype(e.key)) == cfg.pixel_dtype
            # a site that asks for specks decodes an entry without them again
            and (not cfg.specks or cache.has_specks(e.key))
        ):
            old[e.key] = e
            by_source[e.source] = e
    refused_path = cache.root / REFUSED_JSON
    refused: dict[str, dict[str, Any]] = {}
    if refused_path.is_file() and not force:
        try:
            refused = json.loads(refused_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning(
                "%s unreadable, retrying all refused files: %s", refused_path, exc
            )

    # --- plan -----------------------------------------------------------------
    candidates = find_candidates(site, exclude=[cache.root])
    log.info("%s: %d candidate image files", site, len(candidates))
    jobs: list[_Job] = []
    seen_keys: dict[str, str] = {}
    from common.imaging.cache import content_key  # local: keeps the import list short

    for p in candidates:
        rel = p.relative_to(site).as_posix()
        try:
            st = p.stat()
            opts = _options_for(p, rel, cfg, sidecar)
            opts_text = json.dumps(opts, sort_keys=True)
            prev = by_source.get(rel)
            if (
                not force
                and prev is not None
                and prev.size == st.st_size
                and prev.mtime_ns == st.st_mtime_ns
                and prev.options == json.loads(opts_text)
            ):
                key = prev.key
            else:
                key = content_key(p, cfg.working_spacing_mm, extra=opts_text)
        except OSError as exc:
            result.skipped.append({"file": rel, "reason": f"cannot read file: {exc}"})
            continue
        if key in seen_keys:
            why = f"duplicate: byte-identical to {seen_keys[key]} (first file kept)"
            result.skipped.append({"file": rel, "reason": why})
            continue
        seen_keys[key] = rel
        if not force and key in old:
            e = old[key]
            if e.source != rel or e.size != st.st_size or e.mtime_ns != st.st_mtime_ns:
                e = cache.relabel(
                    e, source=rel, size=st.st_size, mtime_ns=st.st_mtime_ns
                )
            run.keep[key] = e
            result.reused.append(key)
            continue
        known = refused.get(key)  # empty with ``force``
        if known is not None and known.get("max_pixels") == cfg.max_pixels:
            run.refused[key] = {**known, "file": rel}
            result.skipped.append({"file": rel, "reason": str(known["reason"])})
            continue
        jobs.append(
            _Job(
                str(p), rel, key, st.st_size, st.st_mtime_ns, opts,
                cfg.working_spacing_mm, cfg.pixel_dtype, str(cache.root),
                cfg.max_pixels, cfg.specks,
            )
        )  # fmt: skip

    # --- decode -----------------------------------------------------------------
    log.info(
        "%d cached, %d to decode, %d known refusals (workers=%d)",
        len(result.reused), len(jobs), len(run.refused), nworkers,
    )  # fmt: skip
    outcomes = _run_jobs(
        jobs, reader, nworkers, cfg.progress_every, cfg.decode_timeout_s
    )
    with contextlib.closing(outcomes):
        for out in outcomes:
            rss = out.get("max_rss_mb")
            if rss is not None:
                result.decode_peak_rss_mb = max(result.decode_peak_rss_mb or 0.0, rss)
            if out["ok"]:
                e = CacheEntry.from_dict(out["entry"])
                run.keep[e.key] = e
                result.new.append(e.key)
            else:
                result.skipped.append({"file": out["rel"], "reason": out["reason"]})
                if not out.get("transient"):
                    run.refused[out["key"]] = {
                        "file": out["rel"],
                        "reason": out["reason"],
                        "max_pixels": cfg.max_pixels,
                    }


def _finish(run: _Run) -> None:
    """Resolve duplicates and write the site files, manifest and report.

    After a whole walk it also drops stale entries and writes refused.json;
    after an interrupted one it writes what was verified so far.
    """
    cache, cfg, result = run.cache, run.cfg, run.result
    refused_path = cache.root / REFUSED_JSON
    if run.walked:
        # --- drop what disappeared (only after a whole walk) ----------------
        for key in sorted(set(cache.keys()) - set(run.keep)):
            cache.remove(key)
            result.removed.append(key)
        atomic_write_text(
            refused_path, json.dumps(run.refused, indent=1, sort_keys=True)
        )

    # --- duplicates ---------------------------------------------------------------
    kept, dup_skips = resolve_duplicates(
        [cache.with_pixel_digest(e) for e in run.keep.values()]
    )
    result.skipped += dup_skips

    # --- site-level files ------------------------------------------------------
    entries = sorted(kept, key=lambda e: e.source)
    entries, density_skips = apply_density(
        cache, entries, run.density, str(run.site / DENSITY_CSV)
    )
    run.table_skips += density_skips
    targets, ann_skips = match_annotations(
        run.annotations,
        ((e.key, e.source, e.meta.sop_instance_uid, e.geometry) for e in entries),
    )
    result.annotation_skips = run.table_skips + (
        run.annotations.skipped if run.annotations else []
    )
    result.annotation_skips += ann_skips
    cache.write_annotations(targets)
    cache.write_split(run.split)
    result.entries = entries
    result.manifest_path = cache.write_manifest(
        [manifest_row(e, targets[e.key].labeled) for e in entries]
    )
    result.skipped.sort(key=lambda s: s["file"])
    result.seconds = time.perf_counter() - run.t_start
    result.report_path = cache.write_report(_report(result, targets, cfg, run.site))
    write_resolved(cfg, cache.root, RESOLVED_CONFIG_YAML)
    log_summary(result, targets)


def resolve_duplicates(
    entries: Iterable[CacheEntry],
) -> tuple[list[CacheEntry], list[dict[str, str]]]:
    """Apply the duplicate rule; returns ``(entries kept, skips)``.

    Labels are attached by path or by SOPInstanceUID, and the split is by
    patient, so two files that are one image, or one UID, must not disagree
    on the patient. In source-path order:

    * the same SOPInstanceUID with different pixels or different PatientIDs:
      every file with that UID is refused (a label keyed by the UID, and the
      patient, would be ambiguous);
    * the same pixels (``pixel_sha256``) under different PatientIDs: every
      such file is refused (the image cannot belong to both patients);
    * otherwise (same UID or same pixels, one patient): the first file is
      kept and the others are set aside as duplicates of it; their own
      annotation rows then match no image and are skipped with a reason.

    Byte-identical files never get here: the walk keeps the first one.
    """
    ordered = sorted(entries, key=lambda e: e.source)
    refused: dict[str, str] = {}

    def conflict(groups: dict[str, list[CacheEntry]], what: str) -> None:
        for value, group in groups.items():
            if len(group) < 2:
                continue
            patients = sorted({e.meta.patient_id or "" for e in group})
            files = ", ".join(e.source for e in group)
            if len(patients) > 1:
                why = "PatientIDs " + ", ".join(repr(p) for p in patients)
            elif len({e.pixel_sha256 for e in group}) > 1:
                why = "different pixels"
            else:
                continue
            for e in group:
                refused.setdefault(
                    e.source,
                    f"{what} {value} shared by {files} with {why}: all refused "
                    "(a label or patient would be ambiguous)",
                )

    by_uid: dict[str, list[CacheEntry]] = {}
    by_pixels: dict[str, list[CacheEntry]] = {}
    for e in ordered:
        if e.meta.sop_instance_uid and e.meta.sop_instance_uid.strip():
            by_uid.setdefault(e.meta.sop_instance_uid.strip(), []).append(e)
        if e.pixel_sha256:
            by_pixels.setdefault(f"sha256:{e.pixel_sha256[:16]}", []).append(e)
    conflict(by_uid, "SOPInstanceUID")
    conflict(by_pixels, "identical pixels")

    kept: list[CacheEntry] = []
    skips: list[dict[str, str]] = []
    first_uid: dict[str, str] = {}
    first_pixels: dict[str, str] = {}
    for e in ordered:
        uid = (e.meta.sop_instance_uid or "").strip()
        if e.source in refused:
            reason = refused[e.source]
        elif uid and uid in first_uid:
            reason = (
                f"duplicate of {first_uid[uid]} (same SOPInstanceUID, pixels and "
                "PatientID): first file kept"
            )
        elif e.pixel_sha256 and e.pixel_sha256 in first_pixels:
            reason = (
                f"duplicate of {first_pixels[e.pixel_sha256]} (same pixels and "
                "PatientID): first file kept"
            )
        else:
            kept.append(e)
            if uid:
                first_uid[uid] = e.source
            if e.pixel_sha256:
                first_pixels[e.pixel_sha256] = e.source
            continue
        skips.append({"file": e.source, "reason": reason})
        log.warning("skipped: %s: %s", e.source, reason)
    return kept, skips


def pool_context() -> multiprocessing.context.BaseContext:
    """Process start method for decode processes: ``forkserver``, readers preloaded.

    Not plain ``fork``: a child forked from a parent that has decoded an image can
    deadlock on locks held by decoder threads (seen with JPEG 2000). Not
    ``spawn`` alone: every worker would import the readers (and torch) again,
    seconds per worker. The fork server imports them once, single-threaded,
    and forks workers from that clean state.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["common.imaging.image_io", "client.ingest"])
    return ctx


def _decode_worker(conn: Connection, reader: Reader | None) -> None:
    """Body of a decode process: jobs in, outcomes out, until ``None`` or EOF.

    Each outcome carries the process's peak resident memory (``max_rss_mb``).
    The process exits after a ``"fatal"`` outcome. SIGINT is left to the
    ingest process, which stops its decode processes itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        out = _run_job(job, reader)
        out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        conn.send(out)
        if out.get("fatal"):
            return


@dataclass
class _Slot:
    """One decode process and the job it is working on."""

    proc: BaseProcess
    conn: Connection
    job: _Job | None = None
    started: float = 0.0


def _start_slot(
    ctx: multiprocessing.context.BaseContext, reader: Reader | None
) -> _Slot:
    parent, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(  # type: ignore[attr-defined]
        target=_decode_worker, args=(child, reader), name="mammofed-decode"
    )
    proc.daemon = True
    try:
        proc.start()
    except Exception as exc:
        parent.close()
        raise MammofedError(
            f"cannot start a decode process: {one_line(exc)} (reader "
            f"{getattr(reader, '__qualname__', 'default')}; a custom reader must "
            "be a module-level function)"
        ) from exc
    finally:
        child.close()
    return _Slot(proc, parent)


def _stop_slot(slot: _Slot, *, ask: bool) -> None:
    """Stop a decode process: ask it to exit (``ask``), then terminate, then kill."""
    if ask:
        with contextlib.suppress(OSError, ValueError):
            slot.conn.send(None)
        slot.proc.join(STOP_GRACE_S)
    for stop in (slot.proc.terminate, slot.proc.kill):
        if not slot.proc.is_alive():
            break
        stop()
        slot.proc.join(STOP_GRACE_S)
    slot.conn.close()


def death_reason(exitcode: int | None) -> tuple[str, bool]:
    """``(reason, transient)`` for a decode process that died without answering.

    A negative exit code is the signal that ended it (SIGSEGV, SIGABRT:
    a crash in native code, remembered as a refusal; SIGKILL: most often the
    kernel's out-of-memory killer, so it is tried again on the next run).
    """
    if exitcode is None:
        return "decode process stopped answering", True
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            return f"decode process killed ({name}; out of memory?)", True
        return f"decoder crashed its process ({name})", False
    return f"decode process exited with code {exitcode} while decoding", False


def decode_isolated(
    jobs: Sequence[_Job], reader: Reader | None, workers: int, timeout_s: float
) -> Generator[dict[str, Any], None, None]:
    """Decode ``jobs`` in ``workers`` separate processes; yield one outcome each.

    Outcomes come in completion order. A process that dies on a file (signal,
    ``os._exit``, out-of-memory kill) or takes longer than ``timeout_s`` on it
    is replaced; that file's outcome says why (``ok`` False). Every process
    started here is stopped before this generator ends, also when it is closed
    early or the caller raises.
    """
    ctx = pool_context()
    pending = deque(jobs)
    slots: list[_Slot] = []

    def fail(job: _Job, reason: str, transient: bool) -> dict[str, Any]:
        log.warning("skipped: %s: %s", job.rel, reason)
        return _failed(job, reason, transient=transient)

    def assign(slot: _Slot) -> _Slot:
        job = pending.popleft()
        for attempt in (1, 2):
            try:
                slot.conn.send(job)
                break
            except (OSError, ValueError):  # died while idle: replace it once
                _stop_slot(slot, ask=False)
                slots.remove(slot)
                if attempt == 2:
                    raise
                slot = _start_slot(ctx, reader)
                slots.append(slot)
        slot.job, slot.started = job, time.monotonic()
        return slot

    try:
        while pending or any(s.job is not None for s in slots):
            for slot in list(slots):
                if slot.job is None and pending:
                    assign(slot)
            while pending and len(slots) < workers:
                slots.append(_start_slot(ctx, reader))
                assign(slots[-1])
            busy = [s for s in slots if s.job is not None]
            left = min(s.started + timeout_s for s in busy) - time.monotonic()
            ready = set(
                wait(
                    [s.conn for s in busy] + [s.proc.sentinel for s in busy],
                    timeout=max(0.0, left),
                )
            )
            for slot in busy:
                job = slot.job
                assert job is not None
                out: dict[str, Any] | None = None
                if slot.conn in ready or slot.proc.sentinel in ready:
                    try:
                        out = slot.conn.recv() if slot.conn.poll() else None
                    except (EOFError, OSError):
                        out = None
                    if out is None:
                        slot.proc.join(STOP_GRACE_S)
                        out = fail(job, *death_reason(slot.proc.exitcode))
                        _stop_slot(slot, ask=False)
                        slots.remove(slot)
                    else:
                        slot.job = None
                        if out.get("fatal"):
                            _stop_slot(slot, ask=True)
                            slots.remove(slot)
                elif time.monotonic() - slot.started > timeout_s:
                    _stop_slot(slot, ask=False)
                    slots.remove(slot)
                    out = fail(
                        job,
                        f"decoding took longer than decode_timeout_s={timeout_s:g} "
                        "s: decode process stopped",
                        True,
                    )
                if out is not None:
                    yield out
    finally:
        for slot in slots:
            _stop_slot(slot, ask=slot.job is None)


def _run_jobs(
    jobs: list[_Job],
    reader: Reader | None,
    workers: int,
    every: int,
    timeout_s: float,
) -> Generator[dict[str, Any], None, None]:
    """Yield job outcomes from :func:`decode_isolated`, logging progress."""
    total = len(jobs)
    if not total:
        return
    t0 = time.perf_counter()
    eta = Eta(total)
    outcomes = decode_isolated(jobs, reader, min(workers, total), timeout_s)
    with contextlib.closing(outcomes):
        for done, out in enumerate(outcomes, start=1):
            yield out
            if done % every == 0 or done == total:
                rate = done / max(time.perf_counter() - t0, 1e-9)
                log.info(
                    "decoded %d/%d files (%.1f files/s; %s)",
                    done, total, rate, eta.reach(done),
                )  # fmt: skip


def _report(
    result: IngestResult, targets: dict[str, Any], cfg: SiteConfig, site: Path
) -> dict[str, Any]:
    new, rss = set(result.new), result.decode_peak_rss_mb
    ingested = []
    for e in result.entries:
        m, t = e.meta, targets[e.key]
        ingested.append(
            {
                "file": e.source,
                "key": e.key,
                "status": "new" if e.key in new else "cached",
                "manufacturer": m.manufacturer,
                "model": m.model,
                "laterality": m.laterality,
                "laterality_source": m.laterality_source,
                "view": m.view,
                "spacing_mm": m.stored_spacing_mm,
                "spacing_source": m.spacing_source,
                "presentation_intent": m.presentation_intent,
                "patient_id": m.patient_id,
                "density": m.density,
                "rows": m.rows,
                "cols": m.cols,
                "model_shape": list(e.geometry.model_shape),
                "labeled": t.labeled,
                "weak": t.weak,
                "lesions": len(t.boxes),
            }
        )
    return {
        "site": cfg.name,
        "site_dir": str(site),
        "status": result.status,
        "error": result.error,
        "working_spacing_mm": cfg.working_spacing_mm,
        "max_pixels": cfg.max_pixels,
        "decode_peak_rss_mb": None if rss is None else round(rss, 1),
        "seconds": round(result.seconds, 3),
        "counts": {
            "ingested": len(result.entries),
            "new": len(result.new),
            "cached": len(result.reused),
            "removed": len(result.removed),
            "skipped": len(result.skipped),
            "annotation_skipped": len(result.annotation_skips),
        },
        "ingested": ingested,
        "skipped": result.skipped,
        "annotation_skipped": [s.to_dict() for s in result.annotation_skips],
    }


def _fmt(c: Counter[str]) -> str:
    return ", ".join(f"{k or '?'}: {v}" for k, v in sorted(c.items())) or "-"


def log_summary(result: IngestResult, targets: dict[str, Any]) -> None:
    """Log a short human summary: counts by vendor, view, laterality; skips."""
    es = result.entries
    log.info(
        "ingested %d images (%d new, %d cached, %d removed) in %.1f s; "
        "%d labeled, %d weakly labeled",
        len(es), len(result.new), len(result.reused), len(result.removed),
        result.seconds,
        sum(1 for e in es if targets[e.key].labeled and not targets[e.key].weak),
        sum(1 for e in es if targets[e.key].weak),
    )  # fmt: skip
    log.info("by vendor: %s", _fmt(Counter(e.meta.manufacturer for e in es)))
    log.info("by view: %s", _fmt(Counter(str(e.meta.view or "") for e in es)))
    log.info("by laterality: %s", _fmt(Counter(e.meta.laterality for e in es)))
    if any(e.meta.density for e in es):
        log.info("by density: %s", _fmt(Counter(e.meta.density or "" for e in es)))
    if result.skipped:
        log.info("skipped %d files:", len(result.skipped))
        for s in result.skipped:
            log.info("  %s: %s", s["file"], s["reason"])
    if result.annotation_skips:
        log.info(
            "%d annotation/table rows skipped (see report)",
            len(result.annotation_skips),
        )
