"""What the DICOM results cost: one exam's CAD SR and presentation states.

A four-view exam (synthetic mammograms of ``--rows`` x ``--cols``, one study)
with ``--detections`` findings per image, half of them above the display
floor: the seconds to build and write its Mammography CAD SR
(:mod:`client.cad_sr`) and its four Grayscale Softcopy Presentation States
(:mod:`client.gsps`), and their bytes; the baseline in the same run is reading
the four headers (what both start from). Best of ``--repeat`` runs.

Figures (one JSON line each, ``benchmarks/results/dicom_outputs.jsonl``):
``read-headers-seconds``, ``cad-sr-seconds``, ``gsps-seconds`` (build and
write, the exam), ``cad-sr-bytes``, ``gsps-bytes`` (the four together).

Usage::

    python -m benchmarks.dicom_outputs --detections 50
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from benchmarks.common import emit, rounded
from benchmarks.synthetic import write_mammo
from client.cad_sr import build_cad_sr, write_cad_sr
from client.gsps import GSPS_SUFFIX, build_exam_gsps, write_gsps
from common.keys import CALCIFICATION, MASS

BENCH = "dicom_outputs"
VIEWS = (("L", "CC", "left"), ("L", "MLO", "left"), ("R", "CC", "right"),
         ("R", "MLO", "right"))  # fmt: skip


def write_exam(folder: Path, rows: int, cols: int) -> list[Path]:
    """Four views of one study and patient in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i, (lat, view, side) in enumerate(VIEWS, start=1):
        path = folder / f"{lat}{view}.dcm"
        write_mammo(path, rows=rows, cols=cols, side=side, image_laterality=lat,
                    view_position=view)  # fmt: skip
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.InstanceNumber = "BENCH", i
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def detections(n: int, rows: int, cols: int, seed: int) -> list[dict[str, object]]:
    """``n`` findings inside a ``rows`` x ``cols`` image, scores spread in [0, 1]."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        w, h = rng.uniform(5, cols / 4), rng.uniform(5, rows / 4)
        x0, y0 = rng.uniform(0, cols - w), rng.uniform(0, rows - h)
        out.append({
            "label": MASS if k % 2 else CALCIFICATION,
            "score": float(rng.uniform(0, 1)),
            "box": [x0, y0, x0 + w, y0 + h],
        })  # fmt: skip
    return out


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    """Emit the figures of the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--cols", type=int, default=1664)
    p.add_argument("--detections", type=int, default=50)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_exam(root / "exam", args.rows, args.cols)
        dets = [detections(args.detections, args.rows, args.cols, i) for i in range(4)]

        def headers() -> list[pydicom.Dataset]:
            return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]

        srcs = headers()

        def sr() -> Path:
            return write_cad_sr(build_cad_sr(srcs, dets), root / "exam.sr.dcm")

        def gsps() -> list[Path]:
            return [
                write_gsps(ps, root / f"{i}{GSPS_SUFFIX}")
                for i, ps in enumerate(build_exam_gsps(srcs, dets))
            ]

        ctx = {
            "images": 4,
            "detections_per_image": args.detections,
            "image": [args.rows, args.cols],
            "repeat": args.repeat,
        }
        t_read = best_of(args.repeat, headers)
        emit(BENCH, "read-headers-seconds", rounded(t_read), "s",
             results_dir=args.results, **ctx)  # fmt: skip
        for name, fn in (("cad-sr", sr), ("gsps", gsps)):
            t = best_of(args.repeat, fn)
            emit(BENCH, f"{name}-seconds", rounded(t), "s", results_dir=args.results,
                 ratio_to_read_headers=rounded(t / t_read), **ctx)  # fmt: skip
        size_sr = (root / "exam.sr.dcm").stat().st_size
        size_ps = sum(f.stat().st_size for f in root.glob(f"*{GSPS_SUFFIX}"))
        emit(BENCH, "cad-sr-bytes", size_sr, "B", results_dir=args.results, **ctx)
        emit(BENCH, "gsps-bytes", size_ps, "B", results_dir=args.results, **ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
