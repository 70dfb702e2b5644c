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

``--take all`` takes every class from ``--calc``: its run mapped into the
``--mass`` run's pixels and keys (``oof_predictions-mapped.json`` beside each
``--calc`` file), so the paired difference is ``--calc`` − ``--mass`` for
both classes, for two recipes at different working spacings.
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
CALC_ONLY = frozenset({CALC})
#: ``--take all``: the --calc run mapped into the --mass run's pixels and keys,
#: written beside the --calc file
MAPPED = "-mapped"


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
    take: frozenset[int] = CALC_ONLY,
) -> list[dict[str, Any]]:
    """``mass_rows`` with their detections of the classes ``take`` from ``calc_rows``.

    Every other class keeps ``mass_rows``' own detections; ground truth, keys
    and cases are always ``mass_rows``'. With ``take`` every class, the result
    is ``calc_rows``' run mapped into ``mass_rows``' pixels and keys, so two
    runs at different working spacings pair image by image.

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
        keep = [i for i, lab in enumerate(r["det_labels"]) if lab not in take]
        moved_i = [i for i, lab in enumerate(other["det_labels"]) if lab in take]
        all_boxes = np.asarray(other["det_boxes"], dtype=np.float64).reshape(-1, 4)
        boxes = all_boxes[moved_i]
        moved = geom_mass.to_model(geom_calc.to_stored(boxes)) if moved_i else boxes
        out.append(
            {
                **r,
                "det_boxes": [r["det_boxes"][i] for i in keep] + moved.tolist(),
                "det_scores": [r["det_scores"][i] for i in keep]
                + [other["det_scores"][i] for i in moved_i],
                "det_labels": [r["det_labels"][i] for i in keep]
                + [other["det_labels"][i] for i in moved_i],
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
    ap.add_argument(
        "--take", choices=("calcification", "all"), default="calcification",
        help="classes taken from --calc: clusters (default), or every class "
        "(--calc's run mapped into --mass's pixels, to pair two spacings)",
    )  # fmt: skip
    ap.add_argument("--label", default="classwise")
    ap.add_argument("--results", type=Path, default=None)
    args = ap.parse_args(argv)
    if len(args.mass) != len(args.calc):
        ap.error("--mass and --calc need as many files (one per seed, in order)")
    mass_index, calc_index = cache_index(args.mass_cache), cache_index(args.calc_cache)
    written = []
    for m, c in zip(args.mass, args.calc, strict=True):
        rows = combine(
            json.loads(m.read_text()),
            json.loads(c.read_text()),
            mass_index,
            calc_index,
            take=frozenset(range(len(CLASSES))) if args.take == "all" else CALC_ONLY,
        )
        out = (
            c.with_name(c.stem + MAPPED + c.suffix)
            if args.take == "all"
            else m.with_name(m.stem + SUFFIX + m.suffix)
        )
        out.write_text(json.dumps(rows))
        written.append(out)
    results = [] if args.results is None else ["--results", str(args.results)]
    return compare_runs_main(
        ["--a", *map(str, args.mass), "--b", *map(str, written),
         "--label", f"mias-{'mapped' if args.take == 'all' else 'classwise'}-"
        f"{args.label}", *results]
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
