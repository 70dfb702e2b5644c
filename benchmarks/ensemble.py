"""Does a site gain by running two of its models together? Paired, over seeds.

A study's regimes leave every scored test image in
``seed-<s>/<regime>/detections.json``. This benchmark fuses, per seed, the
detections of the ``--members`` regimes (``common.detector.ensemble``: weighted
box fusion with the FROC hit radius) and compares the ensemble with each
member on the same women, pooled over the seeds
(:func:`common.detector.froc.pooled_paired_cpm_difference`).

Any two models fused tend to beat one, so each comparison has its control:
the member fused with **itself from the next seed** (two runs of the same
regime, ``(s + 1) mod n``). The ensemble is worth its second model only where
it beats that control too (``ensemble-minus-self-pair``).

Usage::

    python -m benchmarks.ensemble --study out/study --members personalized-dp local-only

The same fusion on cross-validation: ``--oof`` takes the
``oof_predictions.json`` of several ``mammofed-sim crossval`` runs of one
recipe on the same folds (other training seeds) and compares the fused
detector, a model per seed, with each run alone on the pooled out-of-fold
FROC (sensitivity at 1 FP/image and CPM, intervals over women)::

    python -m benchmarks.ensemble --oof out/mias-cv-seed0/oof_predictions.json \
        out/mias-cv-seed1/oof_predictions.json

One JSON line per site, class and comparison in
``benchmarks/results/ensemble.jsonl``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.common import emit, rounded
from common.detector.ensemble import fuse
from common.detector.froc import (
    FrocImage,
    froc_class,
    paired_cpm_difference,
    pooled_paired_cpm_difference,
)
from common.keys import CLASSES
from common.wire import runfolder as RF
from simulation.report import load_detections

BENCH = "ensemble"

Dets = dict[str, list[FrocImage]]


def _seeds(study: Path) -> list[Path]:
    runs = sorted(study.glob("seed-*"), key=lambda p: int(p.name.split("-", 1)[1]))
    if len(runs) < 2:
        raise ValueError(f"{study}: needs at least two seed-<s> folders, found {runs}")
    return runs


def _fused(per_member: list[Dets], site: str) -> list[FrocImage]:
    return fuse([d[site] for d in per_member])


def compare(
    study: Path, members: list[str], *, n_boot: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Rows ``{site, class, comparison, cpm_a, cpm_b, diff, paired_ci95, ...}``.

    Comparisons (``b - a``, means over seeds): ``ensemble-minus-<m>`` for each
    member ``m``, and ``ensemble-minus-self-pair-<m>`` against ``m`` fused with
    its next seed; ``self-pair-minus-<m>`` says what any second run adds.

    Raises:
        ValueError: fewer than two seeds, a member without detections, or
            members that scored other images.
    """
    runs = _seeds(study)
    dets = {
        m: [load_detections(r / m / RF.DETECTIONS_JSON) for r in runs] for m in members
    }
    n = len(runs)
    rows: list[dict[str, Any]] = []
    sites = sorted(set.intersection(*(set(d) for m in members for d in dets[m])))
    for site in sites:
        ens = [_fused([dets[m][s] for m in members], site) for s in range(n)]
        sides: dict[str, tuple[list[list[FrocImage]], list[list[FrocImage]]]] = {}
        for m in members:
            alone = [dets[m][s][site] for s in range(n)]
            pair = [_fused([dets[m][s], dets[m][(s + 1) % n]], site) for s in range(n)]
            sides[f"ensemble-minus-{m}"] = (alone, ens)
            sides[f"ensemble-minus-self-pair-{m}"] = (pair, ens)
            sides[f"self-pair-minus-{m}"] = (alone, pair)
        for comparison, (a, b) in sides.items():
            for label, cls in enumerate(CLASSES):
                try:
                    r = pooled_paired_cpm_difference(
                        a, b, label, n_boot=n_boot, seed=seed
                    )
                except ValueError as exc:
                    raise ValueError(f"site {site}, {comparison}: {exc}") from exc
                rows.append(
                    {
                        "site": site,
                        "class": cls,
                        "comparison": comparison,
                        "cpm_a": rounded(r["cpm_a"]),
                        "cpm_b": rounded(r["cpm_b"]),
                        "diff": r["diff"],
                        "paired_ci95": [rounded(x) for x in r["ci95"]],
                        "n_images": len(a[0]),
                        "n_runs": n,
                    }
                )
    return rows


#: the most a gzipped out-of-fold file may inflate to (a run's file is ~10 MB)
MAX_OOF_BYTES = 512 * 2**20


def oof_records(path: Path) -> list[dict[str, Any]]:
    """The raw records of a crossval run's ``oof_predictions.json``.

    A name ending in ``.gz`` is read through gzip (how ``benchmarks/results``
    keeps them), refused past :data:`MAX_OOF_BYTES` inflated.

    Raises:
        ValueError: unreadable file or not a JSON list (file named).
    """
    import gzip
    import json

    try:
        if str(path).endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read(MAX_OOF_BYTES + 1)
            if len(raw) > MAX_OOF_BYTES:
                raise ValueError(f"inflates past {MAX_OOF_BYTES} bytes")
            text = raw.decode("utf-8")
        else:
            text = Path(path).read_text()
        rows = json.loads(text)
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: not an oof_predictions.json: {exc}") from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: not an oof_predictions.json: not a list of records")
    return rows


def load_oof(path: Path) -> list[FrocImage]:
    """The out-of-fold images of a crossval run (``oof_predictions.json``).

    Read by :func:`oof_records` (``.gz`` too).

    Raises:
        ValueError: unreadable file or a malformed record (file named).
    """
    rows = oof_records(path)
    try:
        return [FrocImage.from_json(r) for r in rows]
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not an oof_predictions.json: {exc}") from exc


def compare_oof(
    paths: list[Path], *, n_boot: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Rows ``{class, detector, cpm, cpm_ci95, sens_at_1fp, ...}`` per class.

    ``detector``: ``run-<i>`` (each file alone) and ``ensemble``; the
    ensemble's rows add ``minus_run_<i>`` paired CPM differences with their
    intervals (women resampled).
    """
    runs = [load_oof(p) for p in paths]
    fused = fuse(runs)
    rows: list[dict[str, Any]] = []
    for label, cls in enumerate(CLASSES):
        for name, images in [*((f"run-{i}", r) for i, r in enumerate(runs)),
                             ("ensemble", fused)]:  # fmt: skip
            r = froc_class(images, label, n_boot=n_boot, seed=seed)
            row: dict[str, Any] = {
                "class": cls,
                "detector": name,
                "cpm": rounded(r.cpm),
                "cpm_ci95": [rounded(x) for x in (r.cpm_ci or (None, None))],
                "sens_at_1fp": rounded(r.sens_at[1.0]),
                "n_images": r.n_images,
                "n_lesions": r.n_lesions,
            }
            if name == "ensemble":
                for i, run in enumerate(runs):
                    d, ci = paired_cpm_difference(
                        run, fused, label, n_boot=n_boot, seed=seed
                    )
                    row[f"minus_run_{i}"] = rounded(d)
                    row[f"minus_run_{i}_ci95"] = [rounded(x) for x in ci]
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Emit the ensemble's paired comparisons for one study."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", type=Path, help="folder of seed-<s>/")
    p.add_argument("--members", nargs="+", help="regimes fused (two or more)")
    p.add_argument(
        "--oof",
        type=Path,
        nargs="+",
        help="crossval oof_predictions.json files of one recipe (two or more)",
    )
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    if args.oof:
        if len(args.oof) < 2:
            p.error("--oof: give two or more files")
        for row in compare_oof(args.oof, n_boot=args.n_boot):
            if row["cpm"] is None:  # no lesion of the class: nothing to measure
                continue
            emit(
                BENCH,
                f"cv-{row.pop('detector')}-cpm-{row['class']}",
                row.pop("cpm"),
                "cpm",
                results_dir=args.results,
                **row,
                oof=[str(x) for x in args.oof],
            )
        return 0
    if args.study is None or not args.members or len(args.members) < 2:
        p.error("give --study and two or more --members, or --oof")
    ctx = {"study": str(args.study), "members": args.members}
    for row in compare(args.study, args.members, n_boot=args.n_boot):
        emit(
            BENCH,
            f"{row.pop('comparison')}-cpm-{row['class']}",
            row.pop("diff"),
            "cpm",
            results_dir=args.results,
            **row,
            **ctx,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
