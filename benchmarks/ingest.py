"""Ingest throughput: the whole ingest path vs bare ``pydicom.dcmread(f).pixel_array``.

Two file sets, each measured in the same run with 1 and 2 workers:

* ``shared``: the shared real DICOM files (``../shared/data/dicom``) whose pixel
  data decodes to a mammogram-sized array (>= 64 px a side); the site config
  gives ``default_spacing_mm`` so the one without spacing is ingested too;
* ``generated``: full-size synthetic FOR PRESENTATION images (about 3000 x 2400,
  14-bit, uncompressed) written with pydicom into a temporary folder.

"ingest" = :func:`client.ingest.ingest_site` into a fresh cache (hashing,
decode, standardize, resample, npz write, annotations, manifest); "bare" =
``pydicom.dcmread(f).pixel_array`` on the same files (a process pool for 2
workers). One JSON line per figure via :func:`benchmarks.common.emit`
(``benchmarks/results/ingest.jsonl``).

Run: ``.venv/bin/python -m benchmarks.ingest [--generated 16] [--repeat 2]``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from benchmarks.common import emit
from benchmarks.synthetic import mg_dataset
from client.ingest import find_candidates, ingest_site, pool_context
from common.config.site import SiteConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DICOM = REPO.parent / "shared" / "data" / "dicom"


def bare_decode(path: str) -> tuple[int, int]:
    """``pydicom.dcmread(path).pixel_array`` -> its shape."""
    arr = pydicom.dcmread(path).pixel_array
    return int(arr.shape[0]), int(arr.shape[1])


def decodable_shared(folder: Path) -> list[Path]:
    """Shared DICOM files whose pixels decode to >= 64 px a side."""
    out = []
    for p in find_candidates(folder):
        try:
            shape = bare_decode(str(p))
        except Exception:  # noqa: BLE001 - files that do not decode are excluded
            continue
        if min(shape) >= 64:
            out.append(p)
    return out


def write_full_size(
    folder: Path, n: int, rows: int = 3000, cols: int = 2400
) -> list[Path]:
    """``n`` synthetic 14-bit mammograms (breast on alternating sides)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    paths = []
    for i in range(n):
        left = i % 2 == 0
        cx = 0 if left else cols - 1
        inside = ((xx - cx) / (0.65 * cols)) ** 2 + (
            (yy - rows / 2) / (0.45 * rows)
        ) ** 2
        img = np.where(inside < 1, 9000.0, 300.0) + rng.normal(0, 250, (rows, cols))
        arr = np.clip(img, 0, 2**14 - 1).astype(np.uint16)
        ds = mg_dataset()
        ds.Modality = "MG"
        ds.PatientID = f"B{i // 2}"
        ds.Manufacturer = "BENCH"
        ds.ImageLaterality = "L" if left else "R"
        ds.ViewPosition = "CC"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelSpacing = ["0.07", "0.07"]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 14, 13
        ds.PixelRepresentation = 0
        ds.PixelData = arr.tobytes()
        p = folder / f"img{i:02d}.dcm"
        pydicom.dcmwrite(p, ds, enforce_file_format=True)
        paths.append(p)
    return paths


def time_bare(paths: list[Path], workers: int) -> float:
    """Seconds to decode every file bare (pool of ``workers`` when > 1)."""
    t0 = time.perf_counter()
    if workers == 1:
        for p in paths:
            bare_decode(str(p))
    else:
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=pool_context()
        ) as pool:
            list(pool.map(bare_decode, [str(p) for p in paths]))
    return time.perf_counter() - t0


def time_ingest(
    site: Path, cfg: SiteConfig, workers: int, scratch: Path
) -> tuple[float, int]:
    """Seconds for a cold ingest of ``site`` and the number of images ingested."""
    cache = scratch / f"cache-{workers}-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    res = ingest_site(site, cache, cfg, workers=workers)
    dt = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    return dt, len(res.entries)


def run(n_generated: int, repeat: int) -> None:
    """Measure both file sets with 1 and 2 workers; emit one line per figure."""
    scratch = Path(tempfile.mkdtemp(prefix="mammofed-bench-"))
    try:
        sets: list[tuple[str, Path, list[Path]]] = []
        if SHARED_DICOM.is_dir():
            shared = decodable_shared(SHARED_DICOM)
            site = scratch / "shared-site"
            for p in shared:
                dst = site / p.relative_to(SHARED_DICOM)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(p)
            sets.append(("shared", site, shared))
        gen_site = scratch / "generated"
        sets.append(("generated", gen_site, write_full_size(gen_site, n_generated)))
        cfg = SiteConfig(name="bench", default_spacing_mm=0.1, progress_every=1000)
        for name, site, paths in sets:
            mb = sum(p.stat().st_size for p in paths) / 2**20
            shapes = sorted({bare_decode(str(p)) for p in paths})
            for workers in (1, 2):
                bare = min(time_bare(paths, workers) for _ in range(repeat))
                runs = [time_ingest(site, cfg, workers, scratch) for _ in range(repeat)]
                ing = min(r[0] for r in runs)
                ctx: dict[str, Any] = {
                    "files": name,
                    "n_files": len(paths),
                    "n_ingested": runs[0][1],
                    "workers": workers,
                    "megabytes": round(mb, 1),
                    "shapes": [list(s) for s in shapes],
                    "working_spacing_mm": cfg.working_spacing_mm,
                    "repeat": repeat,
                }
                emit("ingest", "bare_pixel_array_images_per_s", len(paths) / bare,
                     "img/s", **ctx)  # fmt: skip
                emit("ingest", "ingest_images_per_s", len(paths) / ing, "img/s", **ctx)
                emit("ingest", "ingest_over_bare_time_ratio", ing / bare, "x", **ctx)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--generated N --repeat R``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument(
        "--generated", type=int, default=16, help="full-size files to write"
    )
    ap.add_argument("--repeat", type=int, default=2, help="best of R runs per figure")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    run(args.generated, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
