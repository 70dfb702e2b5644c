"""Two runs of one regime on the same test images: paired CPM differences.

For questions like "does the SuperNode deployment give the figures of the
in-process engine?" or "what does a rerun with another seed change?": both
runs must have scored the same images (the same scenario and data), which
their ``<regime>/detections.json`` prove (matching image keys, else an error).

Usage::

    python -m benchmarks.compare_runs --a out/cpu-study/run/personalized \\
        --b out/cpu-study/run-deploy/personalized --label deployment-vs-inprocess

One JSON line per site and class in ``benchmarks/results/compare_runs.jsonl``:
``b-minus-a-cpm-<class>`` with the paired 95% interval, both CPMs, and the
wall time of each run's regime (``run.json`` ``seconds``) where recorded.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.common import emit, rounded
from common.detector.froc import froc_class, paired_cpm_difference
from common.keys import CLASSES
from common.wire import runfolder as RF
from simulation.report import load_detections

BENCH = "compare_runs"


def _seconds(regime_dir: Path) -> float | None:
    """The regime's wall time from its run's ``run.json``, if recorded."""
    meta = regime_dir.parent / RF.RUN_JSON
    if not meta.is_file():
        return None
    return RF.read_record(RF.StudyRun, meta).seconds.get(regime_dir.name)


def compare(
    a: Path, b: Path, *, n_boot: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Per (site, class): CPM of ``a`` and ``b`` and the paired ``b - a``.

    Raises:
        ValueError: a site's two image sets differ (not the same test images).
    """
    da = load_detections(a / RF.DETECTIONS_JSON)
    db = load_detections(b / RF.DETECTIONS_JSON)
    rows = []
    for site in sorted(set(da) & set(db)):
        for label, cls in enumerate(CLASSES):
            diff, ci = paired_cpm_difference(
                da[site], db[site], label, n_boot=n_boot, seed=seed
            )
            rows.append(
                {
                    "site": site,
                    "class": cls,
                    "cpm_a": rounded(froc_class(da[site], label).cpm),
                    "cpm_b": rounded(froc_class(db[site], label).cpm),
                    "diff": diff,
                    "paired_ci95": [rounded(x) for x in ci],
                    "n_images": len(da[site]),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Emit the paired comparison of two regime folders."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", type=Path, required=True, help="regime folder (baseline)")
    p.add_argument("--b", type=Path, required=True, help="regime folder (compared)")
    p.add_argument("--label", default="b-vs-a", help="name of the comparison")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    ctx = {
        "comparison": args.label,
        "a": str(args.a),
        "b": str(args.b),
        "seconds_a": _seconds(args.a),
        "seconds_b": _seconds(args.b),
    }
    for row in compare(args.a, args.b, n_boot=args.n_boot):
        emit(
            BENCH,
            f"b-minus-a-cpm-{row['class']}",
            row.pop("diff"),
            "cpm",
            results_dir=args.results,
            **row,
            **ctx,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
