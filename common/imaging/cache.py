"""The site cache: ingested images in model space, keyed by content hash.

Layout of ``CACHE_DIR``::

    images/<key>.npz        pixels (uint16 scaled from [0, 1], or float16),
                            model space, shape [H, W]
    images/<key>.json       {"key", "source" (path relative to SITE_DIR),
                             "size", "mtime_ns", "working_spacing_mm",
                             "spacing_mm", "geometry" (Geometry.to_dict()),
                             "meta" (ImageMeta.to_dict(); its "density"
                             comes from SITE_DIR/density.csv, absent or
                             null: unknown), "format",
                             "pixel_sha256" (see pixel_digest),
                             "pixel_dtype" (uint16 or float16)}
    images/<key>.specks.npy float32[N, 3] calcification specks found at the
                            stored resolution, (x, y, z) in model space
                            (common.imaging.specks; only for a site with
                            ``specks: true``)
    annotations.json        {key: ImageTargets.to_dict()}: boxes in stored and
                            model space, labels, ignore regions, labeled/weak
                            flags; rebuilt on every ingest from the site's
                            annotation file and the cached geometries
    split.json              {patient_id: "train" | "test"} from SITE_DIR/split.csv
                            (absent when the site has none)
    manifest.csv            one row per image (common.keys.MANIFEST_COLUMNS)
    ingest_report.json      {"ingested": [...], "skipped": [...], ...}
    resolved_config.yaml    the site config used
    site_root.txt           the absolute SITE_DIR this cache mirrors (ingest
                            drops entries whose file left that folder, so it
                            refuses to fill the cache from another one)

``key`` = sha256 of the file's bytes followed by the working spacing written
with ``repr(float)``, so the same file ingested at another spacing is another
entry. Writes go to a temporary name and are renamed, so a killed ingest never
leaves a half-written entry. The breast density is no part of the key: a
changed ``density.csv`` rewrites the entries' JSON (:meth:`SiteCache.with_density`)
without decoding any pixels.

Reading checks what training would otherwise trust (a tampered or damaged
file raises :class:`CacheError` naming it): ``split.json`` must map patient
ids to :data:`SPLITS`; ``annotations.json`` must hold finite 4-value boxes
with ``xmin < xmax``, ``ymin < ymax``, one label per box among
:data:`common.keys.CLASSES`; a pixel file's ``.npy`` header must give the
shape of the entry's ``geometry.model_shape`` and a stored dtype (uint16 or
float16) before anything is decompressed, and its values must lie in [0, 1].
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from common.errors import MammofedError, shown
from common.fileio import atomic_write, sha256_file
from common.fileio import atomic_write_text as _atomic_write_text
from common.imaging.annotations import ImageTargets
from common.imaging.geometry import Geometry
from common.imaging.image import ImageMeta, MammoImage
from common.keys import CLASSES, INGEST_REPORT_JSON, MANIFEST_COLUMNS, MANIFEST_CSV

log = logging.getLogger(__name__)

#: Bumped when the entry format changes; entries of another format are redone.
CACHE_FORMAT = 1
IMAGES_DIR = "images"
ANNOTATIONS_JSON = "annotations.json"
SPLIT_JSON = "split.json"
SITE_ROOT_TXT = "site_root.txt"
#: The split names of ``split.json`` (and of ``SITE_DIR/split.csv``).
SPLITS: tuple[str, ...] = ("train", "test")
#: dtypes :meth:`SiteCache.write` stores pixels in.
PIXEL_DTYPES: tuple[np.dtype[Any], ...] = (np.dtype(np.uint16), np.dtype(np.float16))
#: A key a log line may show as it is (content keys are hex); others are quoted.
_PLAIN_KEY = re.compile(r"[\w.-]{1,128}", re.ASCII)
#: The array member of a pixel file (``np.savez(fh, pixels=...)``).
_PIXELS_MEMBER = "pixels.npy"
#: What reading a damaged zip member / ``.npy`` header can raise.
_NPZ_ERRORS = (
    OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error,
    NotImplementedError, RuntimeError,
)  # fmt: skip


class CacheError(MammofedError, ValueError):
    """A cache file that is damaged or tampered with.

    The message names the file (and the key, field and value where there is one).
    """


def _read_json(path: Path, what: str) -> Any:
    """``path`` parsed, or :class:`CacheError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CacheError(f"{path}: unreadable {what}: {exc}") from exc


def _check_targets(path: Path, key: str, t: ImageTargets) -> None:
    """Raise :class:`CacheError` unless ``t`` is well-formed (module docstring)."""

    def bad(field: str, value: Any, why: str) -> CacheError:
        return CacheError(f"{path}: {key}: {field} {shown(value)}: {why}")

    for name in ("labeled", "weak", "has_lesion"):
        if not isinstance(getattr(t, name), bool):
            raise bad(name, getattr(t, name), "must be true or false")
    for name in ("boxes_stored", "boxes", "ignore_stored", "ignore"):
        boxes = getattr(t, name)
        if not isinstance(boxes, list):
            raise bad(name, boxes, "must be a list of boxes")
        for b in boxes:
            ok = isinstance(b, list) and len(b) == 4
            ok = ok and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in b
            )
            try:
                ok = ok and all(math.isfinite(float(v)) for v in b)
            except OverflowError:  # an integer beyond float range
                ok = False
            if not ok:
                raise bad(name, b, "a box must be 4 finite numbers")
            if not (b[0] < b[2] and b[1] < b[3]):
                raise bad(name, b, "a box needs xmin < xmax and ymin < ymax")
    labels = t.labels
    if not isinstance(labels, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(CLASSES)
        for v in labels
    ):
        raise bad("labels", labels, f"labels must be indices into {list(CLASSES)}")
    if not len(labels) == len(t.boxes) == len(t.boxes_stored):
        raise bad("labels", labels, "needs one label and stored box per box")
    if len(t.ignore) != len(t.ignore_stored):
        raise bad("ignore", t.ignore, "needs one stored region per ignore region")
    if not isinstance(t.weak_kinds, list) or not all(
        isinstance(v, str) for v in t.weak_kinds
    ):
        raise bad("weak_kinds", t.weak_kinds, "must be a list of finding kinds")


def content_key(path: str | Path, working_spacing_mm: float, extra: str = "") -> str:
    """Hex sha256 of the file bytes, ``repr(working_spacing_mm)`` and ``extra``.

    ``extra`` carries reader options that change the result (sidecar spacing,
    laterality...), so changing them re-ingests the file.
    """
    return sha256_file(path, repr(float(working_spacing_mm)).encode(), extra.encode())


def pixel_digest(stored: np.ndarray) -> str:
    """Hex sha256 of a stored pixel array (dtype, shape and bytes).

    Two entries with the same digest hold the same model-space image: the
    duplicate rule of the ingest compares it (see ``client.ingest``).
    """
    arr = np.ascontiguousarray(stored)
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a cache file atomically (no fsync: a cache can be rebuilt)."""
    _atomic_write_text(path, text, fsync=False)


@dataclass(frozen=True)
class CacheEntry:
    """The JSON part of one cache entry (no pixels).

    Attributes:
        key: content key (see :func:`content_key`).
        source: file path relative to ``SITE_DIR`` (``/`` separators).
        size, mtime_ns: stat of the source when ingested (fast change check).
        working_spacing_mm: the spacing the entry was made for.
        spacing_mm: mm per model-space pixel.
        geometry: stored -> model space mapping.
        meta: header facts.
        options: reader options used (JSON-safe; part of the key).
        pixel_sha256: :func:`pixel_digest` of the stored pixels (``None`` for
            entries written before it existed; :meth:`SiteCache.with_pixel_digest`
            fills it in).
        pixel_dtype: ``"uint16"`` or ``"float16"``, how the pixels are stored
            (``None`` for entries written before it existed:
            :meth:`SiteCache.stored_dtype` reads it from the array's header).
    """

    key: str
    source: str
    size: int
    mtime_ns: int
    working_spacing_mm: float
    spacing_mm: float
    geometry: Geometry
    meta: ImageMeta
    options: dict[str, Any] = field(default_factory=dict)
    pixel_sha256: str | None = None
    pixel_dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {
            **asdict(self),
            "format": CACHE_FORMAT,
            "geometry": self.geometry.to_dict(),
            "meta": self.meta.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CacheEntry:
        """Inverse of :meth:`to_dict`; ``ValueError``/``KeyError`` if malformed."""
        if d.get("format") != CACHE_FORMAT:
            raise ValueError(f"cache format {d.get('format')!r} != {CACHE_FORMAT}")
        return cls(
            key=str(d["key"]),
            source=str(d["source"]),
            size=int(d["size"]),
            mtime_ns=int(d["mtime_ns"]),
            working_spacing_mm=float(d["working_spacing_mm"]),
            spacing_mm=float(d["spacing_mm"]),
            geometry=Geometry.from_dict(d["geometry"]),
            meta=ImageMeta.from_dict(dict(d["meta"])),
            options=dict(d.get("options") or {}),
            pixel_sha256=(
                str(d["pixel_sha256"]) if d.get("pixel_sha256") is not None else None
            ),
            pixel_dtype=(
                str(d["pixel_dtype"]) if d.get("pixel_dtype") is not None else None
            ),
        )


def _npy_header(fh: Any, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` from an open ``.npy`` member's header."""
    version = npy_format.read_magic(fh)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(fh)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(fh)
    raise CacheError(f"{path}: unsupported .npy version {version}")


class SiteCache:
    """Read and write one ``CACHE_DIR`` (layout in the module docstring)."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.root = Path(cache_dir)
        self.images_dir = self.root / IMAGES_DIR

    # --- entries -----------------------------------------------------------
    def pixels_path(self, key: str) -> Path:
        """``images/<key>.npz``."""
        return self.images_dir / f"{key}.npz"

    def entry_path(self, key: str) -> Path:
        """``images/<key>.json``."""
        return self.images_dir / f"{key}.json"

    def specks_path(self, key: str) -> Path:
        """``images/<key>.specks.npy``: the entry's calcification specks."""
        return self.images_dir / f"{key}.specks.npy"

    def has_specks(self, key: str) -> bool:
        """Whether entry ``key`` has its specks file."""
        return self.specks_path(key).is_file()

    def load_specks(self, key: str) -> np.ndarray | None:
        """Entry ``key``'s specks (float32[N, 3], model space), ``None`` if absent.

        Raises:
            CacheError: the file is unreadable or not a float[N, 3] array of
                finite values (an object array is refused unread).
        """
        from common.imaging.specks import MAX_SPECKS, check_specks

        path = self.specks_path(key)
        if not path.is_file():
            return None
        try:
            # the header first (a memory map): a file claiming a huge array is
            # refused before anything is read into memory
            a = np.load(path, mmap_mode="r", allow_pickle=False)
            if a.ndim == 2 and a.shape[1] == 3 and a.shape[0] <= MAX_SPECKS:
                a = np.array(a)
        except (OSError, ValueError, EOFError) as exc:
            raise CacheError(f"{path}: unreadable specks file: {exc}") from exc
        try:
            return check_specks(a, str(path))
        except ValueError as exc:
            raise CacheError(str(exc)) from exc

    def has(self, key: str) -> bool:
        """Whether both files of the entry exist."""
        return self.entry_path(key).is_file() and self.pixels_path(key).is_file()

    def write(
        self,
        key: str,
        image: MammoImage,
        *,
        source: str,
        size: int,
        mtime_ns: int,
        working_spacing_mm: float,
        pixel_dtype: str = "uint16",
        options: Mapping[str, Any] | None = None,
    ) -> CacheEntry:
        """Store ``image`` (pixels float32[H, W] in [0, 1], model space) under ``key``.

        ``pixel_dtype`` ``"uint16"`` stores ``round(p * 65535)``; ``"float16"``
        stores the values as half floats.
        """
        self.images_dir.mkdir(parents=True, exist_ok=True)
        px = np.clip(np.asarray(image.pixels, dtype=np.float32), 0.0, 1.0)
        if pixel_dtype == "uint16":
            stored = np.rint(px * 65535.0).astype(np.uint16)
        elif pixel_dtype == "float16":
            stored = px.astype(np.float16)
        else:
            raise ValueError(
                f"pixel_dtype must be uint16 or float16, got {pixel_dtype!r}"
            )
        if stored.shape != tuple(image.geometry.model_shape):
            raise ValueError(
                f"{source}: pixels shape {stored.shape} != geometry model_shape "
                f"{image.geometry.model_shape}"
            )
        atomic_write(
            self.pixels_path(key), lambda fh: np.savez(fh, pixels=stored), fsync=False
        )
        if image.specks is not None:
            specks = np.ascontiguousarray(image.specks, dtype=np.float32)
            atomic_write(
                self.specks_path(key), lambda fh: np.save(fh, specks), fsync=False
            )
        else:  # a stale file of an earlier decode must not outlive its pixels
            self.specks_path(key).unlink(missing_ok=True)
        entry = CacheEntry(
            key=key,
            source=source,
            size=size,
            mtime_ns=mtime_ns,
            working_spacing_mm=float(working_spacing_mm),
            spacing_mm=float(image.spacing_mm),
            geometry=image.geometry,
            meta=image.meta,
            options=json.loads(json.dumps(dict(options or {}), sort_keys=True)),
            pixel_sha256=pixel_digest(stored),
            pixel_dtype=pixel_dtype,
        )
        return self._save(entry)

    def relabel(
        self, entry: CacheEntry, *, source: str, size: int, mtime_ns: int
    ) -> CacheEntry:
        """Rewrite an entry's JSON for a moved/touched file with the same content."""
        return self._save(replace(entry, source=source, size=size, mtime_ns=mtime_ns))

    def with_pixel_digest(self, entry: CacheEntry) -> CacheEntry:
        """``entry`` with ``pixel_sha256`` set, computing and saving it if absent."""
        if entry.pixel_sha256 is not None:
            return entry
        digest = pixel_digest(self._read_stored(entry.key, entry.geometry.model_shape))
        return self._save(replace(entry, pixel_sha256=digest))

    def with_density(self, entry: CacheEntry, density: str | None) -> CacheEntry:
        """``entry`` with ``meta.density = density``, saved when it changed.

        Raises:
            ValueError: ``density`` is not ``None`` or one of
                :data:`common.imaging.image.DENSITY_VALUES`.
        """
        if entry.meta.density == density:
            return entry
        return self._save(replace(entry, meta=replace(entry.meta, density=density)))

    def _save(self, entry: CacheEntry) -> CacheEntry:
        atomic_write_text(
            self.entry_path(entry.key), json.dumps(entry.to_dict(), indent=1)
        )
        return entry

    def read_entry(self, key: str) -> CacheEntry:
        """The JSON part of entry ``key``.

        Raises:
            FileNotFoundError: missing entry.
            ValueError: malformed entry (not JSON, not an object, a field
                missing or of the wrong type), naming the file.
        """
        path = self.entry_path(key)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise TypeError(f"expected an object, got {type(data).__name__}")
            return CacheEntry.from_dict(data)
        except (  # ValueError: JSONDecodeError and UnicodeDecodeError too
            KeyError, TypeError, ValueError, AttributeError, OverflowError,
            RecursionError,
        ) as exc:  # fmt: skip
            raise ValueError(f"{path}: malformed cache entry: {exc}") from exc

    def load_pixels(
        self, key: str, model_shape: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Pixels float32[H, W] in [0, 1], model space.

        Args:
            key: entry key.
            model_shape: the entry's ``geometry.model_shape`` when the caller
                has it; else it is read from the entry's JSON.

        Raises:
            CacheError: the pixel file is unreadable, its array is not of
                ``model_shape`` and a stored dtype (checked on the ``.npy``
                header, before decompressing), or holds values outside [0, 1]
                (NaN, infinities).
            ValueError, OSError: the entry's JSON is missing or malformed.
        """
        if model_shape is None:
            model_shape = self.read_entry(key).geometry.model_shape
        px = self._read_stored(key, model_shape)
        if px.dtype == np.uint16:
            return px.astype(np.float32) / np.float32(65535.0)
        out = px.astype(np.float32)
        if not (out.min() >= 0.0 and out.max() <= 1.0):  # False for NaN too
            raise CacheError(
                f"{self.pixels_path(key)}: pixel values outside [0, 1] "
                f"(min {out.min()}, max {out.max()}; NaN or infinite values?)"
            )
        return out

    def stored_dtype(self, key: str) -> str | None:
        """``"uint16"`` or ``"float16"``: how entry ``key``'s pixels are stored.

        Read from the ``.npy`` header only; ``None`` when the file is missing,
        unreadable or holds another dtype.
        """
        path = self.pixels_path(key)
        try:
            with zipfile.ZipFile(path) as zf, zf.open(_PIXELS_MEMBER) as fh:
                dtype = _npy_header(fh, path)[2]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, CacheError):
            return None
        return dtype.name if dtype in PIXEL_DTYPES else None

    def _read_stored(self, key: str, model_shape: tuple[int, int]) -> np.ndarray:
        """The stored array of entry ``key`` (a :data:`PIXEL_DTYPES` dtype).

        The ``.npy`` header is checked against ``model_shape`` first, so a file
        claiming a huge array is refused without decompressing it.
        """
        path = self.pixels_path(key)
        want = (int(model_shape[0]), int(model_shape[1]))
        try:
            with zipfile.ZipFile(path) as zf, zf.open(_PIXELS_MEMBER) as fh:
                shape, fortran, dtype = _npy_header(fh, path)
                if dtype not in PIXEL_DTYPES or tuple(shape) != want:
                    raise CacheError(
                        f"{path}: pixel array {tuple(shape)} {dtype} does not match "
                        f"the entry (geometry model_shape {want}, dtype uint16 or "
                        "float16)"
                    )
                n = want[0] * want[1] * dtype.itemsize
                data = fh.read(n)
                extra = fh.read(1)  # reaches the end: the zip CRC is checked
        except CacheError:
            raise
        except _NPZ_ERRORS as exc:
            raise CacheError(f"{path}: unreadable pixel file: {exc}") from exc
        if len(data) != n or extra:
            raise CacheError(
                f"{path}: pixel data is {'longer' if extra else 'shorter'} than its "
                f"header {want} {dtype} says"
            )
        return np.frombuffer(data, dtype=dtype).reshape(
            want, order="F" if fortran else "C"
        )

    def keys(self) -> list[str]:
        """Keys of all entries with a JSON file, sorted."""
        if not self.images_dir.is_dir():
            return []
        return sorted(p.stem for p in self.images_dir.glob("*.json"))

    def iter_entries(self) -> Iterator[CacheEntry]:
        """Every readable entry; malformed ones are logged and skipped."""
        for key in self.keys():
            try:
                yield self.read_entry(key)
            except (OSError, ValueError) as exc:
                log.warning("cache entry %s unreadable, ignored: %s", key, exc)

    def remove(self, key: str) -> None:
        """Delete the files of entry ``key`` (missing files are fine)."""
        for p in (self.entry_path(key), self.pixels_path(key), self.specks_path(key)):
            p.unlink(missing_ok=True)

    # --- site-level files -----------------------------------------------------
    def write_annotations(self, targets: Mapping[str, ImageTargets]) -> None:
        """Write ``annotations.json`` (all keys, model- and stored-space boxes)."""
        data = {k: t.to_dict() for k, t in sorted(targets.items())}
        atomic_write_text(self.root / ANNOTATIONS_JSON, json.dumps(data))

    def read_annotations(self) -> dict[str, ImageTargets]:
        """``annotations.json`` as targets by key; ``{}`` when absent.

        Raises:
            CacheError: unreadable, or a record is malformed (module docstring).
        """
        path = self.root / ANNOTATIONS_JSON
        if not path.is_file():
            return {}
        data = _read_json(path, "annotations cache")
        if not isinstance(data, dict):
            raise CacheError(
                f"{path}: expected an object {{key: targets}}, got "
                f"{type(data).__name__}"
            )
        out: dict[str, ImageTargets] = {}
        for k, v in data.items():
            try:
                t = ImageTargets.from_dict(v)
            except (KeyError, TypeError, AttributeError) as exc:
                raise CacheError(
                    f"{path}: {k}: malformed targets {shown(v)}: {exc!r}"
                ) from exc
            _check_targets(path, k, t)
            out[k] = t
        return out

    def write_split(self, split: Mapping[str, str] | None) -> None:
        """Write ``split.json`` (patient -> train|test), or remove it for ``None``."""
        path = self.root / SPLIT_JSON
        if split is None:
            path.unlink(missing_ok=True)
            return
        atomic_write_text(path, json.dumps(dict(sorted(split.items())), indent=1))

    def read_split(self) -> dict[str, str] | None:
        """The site's own split, or ``None`` when the site gave none.

        Raises:
            CacheError: ``split.json`` is unreadable, not an object, or gives a
                patient a split other than :data:`SPLITS`.
        """
        path = self.root / SPLIT_JSON
        if not path.is_file():
            return None
        data = _read_json(path, "split")
        if not isinstance(data, dict):
            raise CacheError(
                f"{path}: expected an object {{patient_id: split}}, got "
                f"{type(data).__name__}"
            )
        for i, v in enumerate(data.values()):
            if not isinstance(v, str) or v not in SPLITS:
                # the entry's position, not the patient id (no identifier in logs)
                raise CacheError(
                    f"{path}: entry {i + 1}: split {shown(v)} is not one of "
                    f"{', '.join(SPLITS)}"
                )
        return dict(data)

    def write_manifest(self, rows: list[dict[str, Any]]) -> Path:
        """Write ``manifest.csv`` with :data:`common.keys.MANIFEST_COLUMNS`."""
        path = self.root / MANIFEST_CSV
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(MANIFEST_COLUMNS))
        w.writeheader()
        w.writerows({c: _cell(r.get(c)) for c in MANIFEST_COLUMNS} for r in rows)
        atomic_write_text(path, buf.getvalue())
        return path

    def read_manifest(self) -> list[dict[str, str]]:
        """Rows of ``manifest.csv`` (strings); ``[]`` when absent."""
        path = self.root / MANIFEST_CSV
        if not path.is_file():
            return []
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def missing_entries(self) -> list[str]:
        """Keys that ``manifest.csv`` lists but whose entry JSON is missing.

        Such an image is in no dataset (:meth:`iter_entries` lists the JSON
        files), so each is logged as a warning naming the key, the source image
        and the manifest row. An entry whose JSON is there but malformed is not
        listed (:meth:`iter_entries` logs it). No manifest: ``[]``; an
        unreadable one is logged and not checked.
        """
        path = self.root / MANIFEST_CSV
        try:
            rows = list(enumerate(self.read_manifest(), start=2))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            log.warning(
                "%s: unreadable, not checked for missing entries: %s", path, exc
            )
            return []
        missing: list[str] = []
        for i, row in rows:
            key = (row.get("key") or "").strip()
            try:
                present = not key or self.entry_path(key).is_file()
            except (OSError, ValueError):  # e.g. a NUL byte in a tampered key
                present = False
            if present:
                continue
            missing.append(key)
            log.warning(
                "cache entry %s (%s in %s row %d): entry JSON missing, image ignored",
                key if _PLAIN_KEY.fullmatch(key) else shown(key),
                shown(row.get("source") or ""), MANIFEST_CSV, i,
            )  # fmt: skip
        return missing

    def read_site_root(self) -> Path | None:
        """The site folder this cache mirrors (``None``: not recorded yet)."""
        path = self.root / SITE_ROOT_TXT
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise CacheError(f"{path}: unreadable: {exc}") from exc
        return Path(text) if text else None

    def write_site_root(self, site_dir: Path) -> None:
        """Record ``site_dir`` (absolute) as the folder this cache mirrors."""
        atomic_write_text(self.root / SITE_ROOT_TXT, str(Path(site_dir).resolve()))

    def write_report(self, report: Mapping[str, Any]) -> Path:
        """Write ``ingest_report.json``."""
        path = self.root / INGEST_REPORT_JSON
        atomic_write_text(path, json.dumps(report, indent=1))
        return path


def _cell(v: Any) -> Any:
    return "" if v is None else v


def manifest_row(entry: CacheEntry, labeled: bool) -> dict[str, Any]:
    """One ``manifest.csv`` row for a cache entry (``spacing_mm`` = stored spacing)."""
    meta = entry.meta.to_dict()
    return {
        **{c: meta.get(c) for c in MANIFEST_COLUMNS},  # the header facts, in order
        "key": entry.key,
        "source": entry.source,
        "spacing_mm": meta["stored_spacing_mm"],
        "labeled": int(bool(labeled)),
    }
