"""Phantom speed: seconds per image at the demo resolution and at full resolution.

Run: ``.venv/bin/python -m benchmarks.phantom [--full] [--repeats N]``.
Pins itself to one CPU core; one JSON line per figure (benchmarks/common.emit)
appended to ``benchmarks/results/phantom.jsonl``. A figure times the whole path
of one image: anatomy, lesions, exposure, vendor processing, encoding and the
DICOM write.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import emit
from simulation.phantom import load_scenario, plan_site
from simulation.phantom.generate import write_image

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "simulation"


def _time_images(
    scenario_path: Path, site: str, n: int, out: Path
) -> tuple[list[float], tuple[int, int]]:
    scenario = load_scenario(scenario_path)
    plans = plan_site(scenario, scenario.site(site))[:n]
    times = []
    for p in plans:
        t0 = time.perf_counter()
        write_image(scenario, p, out)
        times.append(time.perf_counter() - t0)
    import pydicom

    ds = pydicom.dcmread(out / plans[0].relpath, stop_before_pixels=True)
    return times, (int(ds.Rows), int(ds.Columns))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=8, help="demo images per vendor")
    ap.add_argument(
        "--full", action="store_true", help="also one full-resolution image per vendor"
    )
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    with tempfile.TemporaryDirectory() as tmp:
        demo = load_scenario(CONFIGS / "demo.yaml")
        for site in demo.sites:
            times, shape = _time_images(
                CONFIGS / "demo.yaml", site.name, args.repeats, Path(tmp) / site.name
            )
            emit(
                "phantom",
                "seconds_per_image_demo",
                statistics.median(times),
                "s",
                scenario="demo",
                site=site.name,
                vendor=site.vendor,
                stored_shape=list(shape),
                images=len(times),
                min_s=min(times),
                max_s=max(times),
                cores=1,
                numpy=np.__version__,
            )
        if args.full:
            bench = load_scenario(CONFIGS / "benchmark.yaml")
            for site in bench.sites:
                times, shape = _time_images(
                    CONFIGS / "benchmark.yaml",
                    site.name,
                    1,
                    Path(tmp) / ("full" + site.name),
                )
                emit(
                    "phantom",
                    "seconds_per_image_full",
                    times[0],
                    "s",
                    scenario="benchmark",
                    site=site.name,
                    vendor=site.vendor,
                    stored_shape=list(shape),
                    pitch_mm=bench.detector_pitch_mm(bench.vendor_of(site)),
                    cores=1,
                    numpy=np.__version__,
                )


if __name__ == "__main__":
    main()
