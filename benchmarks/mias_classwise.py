"""Each class from the recipe that finds it best: masses at 0.4 mm, clusters at 0.2 mm.

The 0.4 mm whole-image recipe finds masses best (CPM about 0.7 on the
mini-MIAS cross-validation) and the native 0.2 mm patch recipe with hard
negatives finds calcification clusters best (about 0.23 against 0.13-0.20,
``docs/detector.md``). A two-model recipe would take each class from its own
model. This benchmark asks what that gives, without training anything: on two
cross-validation runs of the same folds (the same women held out), each image
keeps the mass detections of ``--mass`` and gets the calcification
detections of ``--calc``, mapped through the stored file's pixels (each
cache's own :class:`common.imaging.geometry.Geometry`: the two caches may
crop and resample differently). Images are matched by their source file.

Usage (seeds pair in order)::

    python -m benchmarks.mias_classwise \\
        --mass out/mias04-seed{0,1,2}/oof_predictions.json \\
        --mass-cache out/mini-mias/cache \\
        --calc out/mias-hn-seed{0,1,2}/oof_predictions.json \\
        --calc-cache out/mini-mias/cache-native --label 04-masses-hn-clusters

writes ``oof_predictions-classwise.json`` beside each ``--mass`` file and, in
``--results``/compare_runs.jsonl, the paired difference (class-wise − the
``--mass`` run alone) per class, seeds pooled.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.compare_runs import main as compare_runs_main
from common.imaging.geometry import Geometry
from common.keys import CLASSES

#: Suffix of the combined out-of-fold file written beside each ``--mass`` file.
SUFFIX = "-classwise"
MASS, CALC = CLASSES.index("mass"), CLASSES.index("calcification")


def cache_index(cache: Path) -> dict[str, tuple[str, Geometry]]:
    """``{image hash: (source file, geometry)}`` of a site cache's images."""
    out: dict[str, tuple[str, Geometry]] = {}
    for meta_path in sorted((cache / "images").glob("*.json")):
        doc = json.loads(meta_path.read_text())
        out[meta_path.stem] = (
            str(doc["meta"]["source"]),
            Geometry.from_dict(doc["geometry"]),
        )
    return out


def _hash(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def combine(
    mass_rows: list[dict[str, Any]],
    calc_rows: list[dict[str, Any]],
    mass_index: dict[str, tuple[str, Geometry]],
    calc_index: dict[str, tuple[str, Geometry]],
) -> list[dict[str, Any]]:
    """``mass_rows`` with their calcification detections taken from ``calc_rows``.

    Raises:
        ValueError: an image of one run that the other did not score (the runs
            are not the same folds' women).
    """
    by_source = {calc_index[_hash(r["key"])][0]: r for r in calc_rows}
    out = []
    for r in mass_rows:
        source, geom_mass = mass_index[_hash(r["key"])]
        other = by_source.pop(source, None)
        if other is None:
            raise ValueError(f"{source}: scored by the mass run only")
        geom_calc = calc_index[_hash(other["key"])][1]
        keep = [i for i, lab in enumerate(r["det_labels"]) if lab == MASS]
        take = [i for i, lab in enumerate(other["det_labels"]) if lab == CALC]
        boxes = np.asarray(other["det_boxes"], dtype=np.float64).reshape(-1, 4)[take]
        moved = geom_mass.to_model(geom_calc.to_stored(boxes)) if take else boxes
        out.append(
            {
                **r,
                "det_boxes": [r["det_boxes"][i] for i in keep] + moved.tolist(),
                "det_scores": [r["det_scores"][i] for i in keep]
                + [other["det_scores"][i] for i in take],
                "det_labels": [MASS] * len(keep) + [CALC] * len(take),
            }
        )
    if by_source:
        raise ValueError(
            f"{sorted(by_source)[0]}: scored by the calcification run only"
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: combine each seed's pair and compare it with the mass run alone."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mass", type=Path, nargs="+", required=True)
    ap.add_argument("--mass-cache", type=Path, required=True)
    ap.add_argument("--calc", type=Path, nargs="+", required=True)
    ap.add_argument("--calc-cache", type=Path, required=True)
    ap.add_argument("--label", default="classwise")
    ap.add_argument("--results", type=Path, default=None)
    args = ap.parse_args(argv)
    if len(args.mass) != len(args.calc):
        ap.error("--mass and --calc need as many files (one per seed, in order)")
    mass_index, calc_index = cache_index(args.mass_cache), cache_index(args.calc_cache)
    written = []
    for m, c in zip(args.mass, args.calc, strict=True):
        rows = combine(
            json.loads(m.read_text()), json.loads(c.read_text()), mass_index, calc_index
        )
        out = m.with_name(m.stem + SUFFIX + m.suffix)
        out.write_text(json.dumps(rows))
        written.append(out)
    results = [] if args.results is None else ["--results", str(args.results)]
    return compare_runs_main(
        ["--a", *map(str, args.mass), "--b", *map(str, written),
         "--label", f"mias-classwise-{args.label}", *results]
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
