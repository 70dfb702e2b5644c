"""Site ingest: walk ``SITE_DIR``, decode every image once, fill the site cache.

What :func:`ingest_site` does, in order:

1. reads ``SITE_DIR/images.csv`` (research images: ``image, patient_id,
   laterality, view, spacing_mm``) and ``SITE_DIR/split.csv`` (``patient_id,
   split``), skipping broken rows with a logged reason;
2. walks the tree; DICOM files (known suffix, or recognised by content) and
   PNG/TIFF files are candidates, everything else (``annotations.csv``,
   ``split.csv``, ``images.csv``, text, licences...) is passed over quietly;
3. per candidate, reuses the cache entry when the file's size and mtime (and its
   sidecar options) are unchanged, or when its content key is already cached;
   otherwise decodes it with :func:`common.image_io.read_any` in a process pool
   (:func:`pool_context`; ``workers == 1`` runs inline) and writes
   ``images/<key>.npz|json``;
   files refused before with the same content are not decoded again (their
   reasons are kept in ``refused.json``; ``force=True`` retries everything);
4. drops entries whose source disappeared or changed;
5. rebuilds ``annotations.json`` (cheap: from the annotation file and the cached
   geometries, no pixels), ``split.json``, ``manifest.csv``,
   ``ingest_report.json`` and ``resolved_config.yaml``.

One bad file never aborts the walk: it is listed under ``skipped`` with its reason.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.annotations import (
    ANNOTATIONS_JSON,
    Skip,
    match_annotations,
    normalize_ref,
    read_csv_records,
    read_site_annotations,
)
from common.cache import CacheEntry, SiteCache, atomic_write_text, manifest_row
from common.config import write_resolved
from common.config.site import SiteConfig
from common.errors import MammofedError, RefusedImage
from common.image import MammoImage
from common.keys import (
    ANNOTATIONS_CSV,
    LEFT,
    RESOLVED_CONFIG_YAML,
    RIGHT,
    SPLIT_CSV,
)

log = logging.getLogger(__name__)

#: Sidecar table of research images in ``SITE_DIR``.
IMAGES_CSV = "images.csv"
IMAGES_CSV_COLUMNS: tuple[str, ...] = (
    "image",
    "patient_id",
    "laterality",
    "view",
    "spacing_mm",
)
SPLIT_COLUMNS: tuple[str, ...] = ("patient_id", "split")
SPLIT_VALUES = ("train", "test")
#: Remembered refusals (key -> {"file", "reason"}) so unchanged bad files are
#: not decoded again.
REFUSED_JSON = "refused.json"

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
RESEARCH_SUFFIXES = frozenset({".png", ".tif", ".tiff"})
#: Suffixes never looked at (documentation, tables, configs...).
NON_IMAGE_SUFFIXES = frozenset(
    {
        ".csv", ".json", ".txt", ".md", ".rst", ".yaml", ".yml", ".xml",
        ".html", ".pdf", ".py", ".zip", ".gz", ".tmp", ".npz", ".log",
    }
)  # fmt: skip
SITE_FILES = frozenset({ANNOTATIONS_CSV, ANNOTATIONS_JSON, SPLIT_CSV, IMAGES_CSV})

#: ``reader(path, *, working_spacing_mm, default_spacing_mm, spacing_mm,
#: laterality, view, patient_id) -> MammoImage``; must be picklable (a
#: module-level function) when ``workers > 1``.
Reader = Callable[..., MammoImage]


@dataclass(frozen=True)
class SidecarRow:
    """One row of ``images.csv`` (research images)."""

    patient_id: str | None
    laterality: str | None
    view: str | None
    spacing_mm: float | None


def _skip(
    skips: list[Skip], file: str, row: int | None, fld: str, value: Any, why: str
) -> None:
    s = Skip(file, row, fld, str(value), why)
    skips.append(s)
    log.warning("skipped: %s", s.message())


def _read_csv(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    return [
        (i, {k: (v or "").strip() for k, v in rec.items() if isinstance(k, str)})
        for i, rec in read_csv_records(path, columns)
    ]


def read_images_csv(path: str | Path) -> tuple[dict[str, SidecarRow], list[Skip]]:
    """Parse the research-image sidecar; bad rows are skipped with a reason.

    Returns:
        ``({normalized relative path: row}, skips)``.

    Raises:
        MammofedError: unreadable file or missing columns.
    """
    p = Path(path)
    out: dict[str, SidecarRow] = {}
    skips: list[Skip] = []
    for i, rec in _read_csv(p, ("image",)):
        ref = normalize_ref(rec.get("image", ""))
        if not ref:
            _skip(skips, str(p), i, "image", rec.get("image", ""), "empty image path")
            continue
        lat = rec.get("laterality", "").upper() or None
        if lat is not None and lat not in (LEFT, RIGHT):
            _skip(skips, str(p), i, "laterality", lat, "must be L, R or empty")
            continue
        spacing: float | None = None
        raw = rec.get("spacing_mm", "")
        if raw:
            try:
                spacing = float(raw)
            except ValueError:
                spacing = math.nan
            if not (math.isfinite(spacing) and 0.01 <= spacing <= 5.0):
                _skip(
                    skips, str(p), i, "spacing_mm", raw, "must be a number in [0.01, 5]"
                )
                continue
        if ref in out:
            _skip(skips, str(p), i, "image", ref, "duplicate row (first one kept)")
            continue
        out[ref] = SidecarRow(
            patient_id=rec.get("patient_id") or None,
            laterality=lat,
            view=rec.get("view", "").upper() or None,
            spacing_mm=spacing,
        )
    return out, skips


def read_split_csv(path: str | Path) -> tuple[dict[str, str], list[Skip]]:
    """Parse ``split.csv`` (``patient_id, split`` in ``train|test``).

    Raises:
        MammofedError: unreadable file or missing columns.
    """
    p = Path(path)
    out: dict[str, str] = {}
    skips: list[Skip] = []
    for i, rec in _read_csv(p, SPLIT_COLUMNS):
        pid, split = rec.get("patient_id", ""), rec.get("split", "").lower()
        if not pid:
            _skip(skips, str(p), i, "patient_id", pid, "empty patient id")
        elif split not in SPLIT_VALUES:
            _skip(
                skips, str(p), i, "split", rec.get("split", ""), "must be train or test"
            )
        elif pid in out and out[pid] != split:
            _skip(
                skips, str(p), i, "split", split, f"conflicts with earlier {out[pid]!r}"
            )
        else:
            out[pid] = split
    return out, skips


def _looks_like_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    from common.dicom import is_dicom  # deferred: pydicom import is slow

    return is_dicom(path)


def find_candidates(site_dir: str | Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """Image files under ``site_dir`` (sorted), passing over non-image files quietly.

    Hidden files/folders and anything under ``exclude`` (e.g. a cache folder
    inside the site folder) are not visited.
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
            if name.startswith(".") or not p.is_file():
                continue
            if d == root and name in SITE_FILES:
                continue
            suffix = p.suffix.lower()
            if suffix in DICOM_SUFFIXES or suffix in RESEARCH_SUFFIXES:
                found.append(p)
            elif suffix in NON_IMAGE_SUFFIXES:
                log.debug("not an image, passed over: %s", p)
            elif _looks_like_dicom(p):
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


def _default_reader() -> Reader:
    from common.image_io import read_any

    return read_any


def _run_job(job: _Job, reader: Reader | None) -> dict[str, Any]:
    """Decode one file and write its entry; never raises (returns the outcome)."""
    rd = reader or _default_reader()
    t0 = time.perf_counter()
    try:
        img = rd(job.path, working_spacing_mm=job.working_spacing_mm, **job.options)
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
        return {"rel": job.rel, "key": job.key, "ok": False, "reason": exc.reason}
    except MemoryError:
        return {"rel": job.rel, "key": job.key, "ok": False, "reason": "out of memory"}
    except Exception as exc:  # noqa: BLE001 - one bad file must not abort the walk
        first = (str(exc).strip().splitlines() or [""])[0]
        return {
            "rel": job.rel,
            "key": job.key,
            "ok": False,
            "reason": f"unexpected {type(exc).__name__}: {first}",
            "transient": True,
        }
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
        entries: cache entries now in the cache (one per ingested image).
        new: keys decoded in this run.
        reused: keys taken from the cache unchanged.
        removed: keys dropped (source gone or changed).
        skipped: ``{"file", "reason"}`` per file not ingested.
        annotation_skips: annotation rows not used (file, row, field, value, why).
        report_path, manifest_path: files written.
        seconds: wall time of the run.
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


def _options_for(
    p: Path, rel: str, cfg: SiteConfig, sidecar: dict[str, SidecarRow]
) -> dict[str, Any]:
    """Reader keyword options for one file (part of its cache key)."""
    opts: dict[str, Any] = {"default_spacing_mm": cfg.default_spacing_mm}
    if p.suffix.lower() in RESEARCH_SUFFIXES:
        row = sidecar.get(rel)
        if row is not None:
            opts.update(
                spacing_mm=row.spacing_mm,
                laterality=row.laterality,
                view=row.view,
                patient_id=row.patient_id,
            )
    return opts


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
        workers: decode processes (``None``: ``cfg.workers``; 1 = inline).
        reader: image reader (default :func:`common.image_io.read_any`).
        force: decode every file again, ignoring cached entries and refusals.

    Returns:
        An :class:`IngestResult`; ``entries`` empty means nothing could be ingested.

    Raises:
        MammofedError: ``site_dir`` is not a folder, or a site table
            (``images.csv``, ``split.csv``, the annotation file) is unreadable
            as a whole.
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
    result = IngestResult()
    table_skips: list[Skip] = []

    sidecar: dict[str, SidecarRow] = {}
    if (site / IMAGES_CSV).is_file():
        sidecar, sk = read_images_csv(site / IMAGES_CSV)
        table_skips += sk
    split: dict[str, str] | None = None
    if (site / SPLIT_CSV).is_file():
        split, sk = read_split_csv(site / SPLIT_CSV)
        table_skips += sk
    annotations = read_site_annotations(site, cfg.finding_kind)

    # --- what is cached already -------------------------------------------------
    old: dict[str, CacheEntry] = {}
    by_source: dict[str, CacheEntry] = {}
    for e in cache.iter_entries():
        if e.working_spacing_mm == cfg.working_spacing_mm and cache.has(e.key):
            old[e.key] = e
            by_source[e.source] = e
    refused_path = cache.root / REFUSED_JSON
    refused: dict[str, dict[str, str]] = {}
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
    keep: dict[str, CacheEntry] = {}
    jobs: list[_Job] = []
    new_refused: dict[str, dict[str, str]] = {}
    seen_keys: dict[str, str] = {}
    from common.cache import content_key  # local: keeps the import list short

    for p in candidates:
        rel = p.relative_to(site).as_posix()
        try:
            st = p.stat()
            opts = _options_for(p, rel, cfg, sidecar)
            prev = by_source.get(rel)
            if (
                not force
                and prev is not None
                and prev.size == st.st_size
                and prev.mtime_ns == st.st_mtime_ns
                and prev.options == _json_norm(opts)
            ):
                key = prev.key
            else:
                key = content_key(p, cfg.working_spacing_mm, extra=_options_text(opts))
        except OSError as exc:
            result.skipped.append({"file": rel, "reason": f"cannot read file: {exc}"})
            continue
        if key in seen_keys:
            result.skipped.append(
                {"file": rel, "reason": f"identical content to {seen_keys[key]}"}
            )
            continue
        seen_keys[key] = rel
        if not force and key in old:
            e = old[key]
            if e.source != rel or e.size != st.st_size or e.mtime_ns != st.st_mtime_ns:
                e = cache.relabel(
                    e, source=rel, size=st.st_size, mtime_ns=st.st_mtime_ns
                )
            keep[key] = e
            result.reused.append(key)
            continue
        if not force and key in refused:
            new_refused[key] = {"file": rel, "reason": refused[key]["reason"]}
            result.skipped.append({"file": rel, "reason": refused[key]["reason"]})
            continue
        jobs.append(
            _Job(
                str(p), rel, key, st.st_size, st.st_mtime_ns, opts,
                cfg.working_spacing_mm, cfg.pixel_dtype, str(cache.root),
            )
        )  # fmt: skip

    # --- decode -----------------------------------------------------------------
    log.info(
        "%d cached, %d to decode, %d known refusals (workers=%d)",
        len(result.reused), len(jobs), len(new_refused), nworkers,
    )  # fmt: skip
    for out in _run_jobs(jobs, reader, nworkers, cfg.progress_every):
        if out["ok"]:
            e = CacheEntry.from_dict(out["entry"])
            keep[e.key] = e
            result.new.append(e.key)
        else:
            result.skipped.append({"file": out["rel"], "reason": out["reason"]})
            if not out.get("transient"):
                new_refused[out["key"]] = {"file": out["rel"], "reason": out["reason"]}

    # --- drop what disappeared -------------------------------------------------
    for key in sorted(set(cache.keys()) - set(keep)):
        cache.remove(key)
        result.removed.append(key)
    atomic_write_text(refused_path, json.dumps(new_refused, indent=1, sort_keys=True))

    # --- site-level files ------------------------------------------------------
    entries = sorted(keep.values(), key=lambda e: e.source)
    targets, ann_skips = match_annotations(
        annotations,
        ((e.key, e.source, e.meta.sop_instance_uid, e.geometry) for e in entries),
    )
    result.annotation_skips = table_skips + (annotations.skipped if annotations else [])
    result.annotation_skips += ann_skips
    cache.write_annotations(targets)
    cache.write_split(split)
    result.entries = entries
    result.manifest_path = cache.write_manifest(
        [manifest_row(e, targets[e.key].labeled) for e in entries]
    )
    result.skipped.sort(key=lambda s: s["file"])
    result.seconds = time.perf_counter() - t_start
    result.report_path = cache.write_report(_report(result, targets, cfg, site))
    write_resolved(cfg, cache.root, RESOLVED_CONFIG_YAML)
    log_summary(result, targets)
    return result


def _json_norm(opts: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(json.dumps(opts, sort_keys=True)))


def _options_text(opts: dict[str, Any]) -> str:
    return json.dumps(opts, sort_keys=True)


def pool_context() -> multiprocessing.context.BaseContext:
    """Process start method for decode pools: ``forkserver`` with the readers preloaded.

    Not plain ``fork``: a child forked from a parent that has decoded an image can
    deadlock on locks held by decoder threads (seen with JPEG 2000). Not
    ``spawn`` alone: every worker would import the readers (and torch) again,
    seconds per worker. The fork server imports them once, single-threaded,
    and forks workers from that clean state.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["common.image_io", "client.ingest"])
    return ctx


def _run_jobs(
    jobs: list[_Job], reader: Reader | None, workers: int, every: int
) -> Iterable[dict[str, Any]]:
    """Yield job outcomes (inline for one worker), logging progress."""
    total = len(jobs)
    if not total:
        return
    t0 = time.perf_counter()

    def progress(done: int) -> None:
        if done % every == 0 or done == total:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            log.info("decoded %d/%d files (%.1f files/s)", done, total, rate)

    if workers == 1 or total == 1:
        for i, job in enumerate(jobs, start=1):
            yield _run_job(job, reader)
            progress(i)
        return
    with ProcessPoolExecutor(
        max_workers=min(workers, total), mp_context=pool_context()
    ) as pool:
        futures = [pool.submit(_run_job, job, reader) for job in jobs]
        for i, fut in enumerate(as_completed(futures), start=1):
            yield fut.result()
            progress(i)


def _report(
    result: IngestResult, targets: dict[str, Any], cfg: SiteConfig, site: Path
) -> dict[str, Any]:
    new = set(result.new)
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
        "working_spacing_mm": cfg.working_spacing_mm,
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
    if result.skipped:
        log.info("skipped %d files:", len(result.skipped))
        for s in result.skipped:
            log.info("  %s: %s", s["file"], s["reason"])
    if result.annotation_skips:
        log.info(
            "%d annotation/table rows skipped (see report)",
            len(result.annotation_skips),
        )
