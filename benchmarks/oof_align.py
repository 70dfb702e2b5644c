"""Put one cross-validation run's detections on another run's images.

Two recipes at different working spacings (0.2, 0.4, 0.8 mm) ingest the same
files into different caches, so their out-of-fold files
(``oof_predictions.json`` of ``mammofed-sim crossval``) name other image keys
(a key includes the spacing) and hold boxes in other pixel spaces:
``benchmarks.compare_runs`` and ``benchmarks.ensemble --oof`` refuse to pair
them. This writes the run's detections onto the reference run's images:

* images matched by their source file, through each cache's ``manifest.csv``;
* detection boxes scaled by the spacing ratio into the reference's pixels;
* ground truth, ignore regions, spacing and woman taken from the reference
  (the same annotations, at the reference's resolution).

Refused, naming the file and the image: a source missing on either side or
listed twice, a fold that differs (not the same cross-validation), or ground
truth that disagrees by more than ``--tolerance-mm`` (default 2 mm) between
the two files (the caches do not hold the same annotations).

Usage::

    python -m benchmarks.oof_align \\
        --ref out/cv04/oof_predictions.json --ref-cache out/mini-mias/cache \\
        --run out/cvn/oof_predictions.json --run-cache out/mini-mias/cache-native \\
        --out out/cvn/oof_predictions-in04.json
    python -m benchmarks.compare_runs --a out/cv04/oof_predictions.json \\
        --b out/cvn/oof_predictions-in04.json --label native-vs-04mm
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

from common.detector.froc import FrocImage
from common.imaging.cache import SiteCache
from common.keys import MANIFEST_CSV

#: Fields taken from the reference image (the run keeps its detections).
REF_FIELDS = ("key", "spacing_mm", "gt_boxes", "gt_labels", "ignore_boxes", "case")


def _sources(cache: Path) -> dict[str, str]:
    """``{key: source}`` of ``cache/manifest.csv``; a source listed twice is refused."""
    path = Path(cache) / MANIFEST_CSV
    try:
        rows = SiteCache(cache).read_manifest()
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read the cache manifest: {exc}") from exc
    if not rows:
        raise ValueError(f"{path}: missing or empty cache manifest")
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for i, r in enumerate(rows, start=2):
        key, src = r.get("key"), r.get("source")
        if not key or not src:
            raise ValueError(f"{path}: line {i}: no key or source")
        if src in seen:
            raise ValueError(
                f"{path}: source {src!r} listed twice (keys {seen[src]}, {key})"
            )
        seen[src] = key
        out[key] = src
    return out


def _rows(path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(Path(path).read_text())
        for r in rows:
            FrocImage.from_json(r)  # validates every field
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not an oof_predictions.json: {exc}") from exc
    if not isinstance(rows, list):
        raise ValueError(f"{path}: not an oof_predictions.json (not a list)")
    return rows


def _local(key: str) -> str:
    """A crossval key is ``<cache name>/<cache key>``."""
    return str(key).split("/", 1)[-1]


def _centres_mm(boxes: list[list[float]], spacing: float) -> list[tuple[float, float]]:
    return sorted(
        ((b[0] + b[2]) / 2 * spacing, (b[1] + b[3]) / 2 * spacing) for b in boxes
    )


def align(
    ref: Path,
    ref_cache: Path,
    run: Path,
    run_cache: Path,
    *,
    tolerance_mm: float = 2.0,
) -> list[dict[str, Any]]:
    """The rows of ``run`` on the images of ``ref`` (module docstring)."""
    ref_rows, run_rows = _rows(ref), _rows(run)
    ref_src, run_src = _sources(ref_cache), _sources(run_cache)
    by_source: dict[str, dict[str, Any]] = {}
    for r in ref_rows:
        src = ref_src.get(_local(r["key"]))
        if src is None:
            raise ValueError(f"{ref}: image {r['key']!r} is not in {ref_cache}")
        by_source[src] = r
    out: list[dict[str, Any]] = []
    for r in run_rows:
        src = run_src.get(_local(r["key"]))
        if src is None:
            raise ValueError(f"{run}: image {r['key']!r} is not in {run_cache}")
        base = by_source.pop(src, None)
        if base is None:
            raise ValueError(f"{run}: source {src!r} has no image in {ref}")
        if r.get("fold") != base.get("fold"):
            raise ValueError(
                f"{run}: {src}: fold {r.get('fold')!r}, but {base.get('fold')!r} "
                f"in {ref}: not the same cross-validation"
            )
        s = float(r["spacing_mm"]) / float(base["spacing_mm"])
        a = _centres_mm(r["gt_boxes"], float(r["spacing_mm"]))
        b = _centres_mm(base["gt_boxes"], float(base["spacing_mm"]))
        far = any(math.dist(p, q) > tolerance_mm for p, q in zip(a, b, strict=False))
        if len(a) != len(b) or far:
            raise ValueError(
                f"{run}: {src}: ground truth differs from {ref} "
                f"(centres in mm {a} against {b})"
            )
        row = dict(r)
        row["det_boxes"] = [[float(v) * s for v in box] for box in r["det_boxes"]]
        row.update({f: base[f] for f in REF_FIELDS})
        out.append(row)
    if by_source:
        raise ValueError(
            f"{ref}: {len(by_source)} image(s) not in {run}, e.g. "
            f"{sorted(by_source)[:3]}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", type=Path, required=True, help="reference oof file")
    p.add_argument("--ref-cache", type=Path, required=True, help="its cache")
    p.add_argument("--run", type=Path, required=True, help="oof file to move")
    p.add_argument("--run-cache", type=Path, required=True, help="its cache")
    p.add_argument("--out", type=Path, required=True, help="file to write")
    p.add_argument("--tolerance-mm", type=float, default=2.0)
    args = p.parse_args(argv)
    try:
        rows = align(
            args.ref,
            args.ref_cache,
            args.run,
            args.run_cache,
            tolerance_mm=args.tolerance_mm,
        )
    except ValueError as exc:
        print(f"oof_align: {exc}")
        return 1
    args.out.write_text(json.dumps(rows))
    print(f"{len(rows)} images written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
