"""Two runs of one regime on the same test images: paired CPM differences.

For questions like "does the SuperNode deployment give the figures of the
in-process engine?" or "what does a rerun with another seed change?": both
runs must have scored the same images (the same scenario and data), which
their ``<regime>/detections.json`` prove (matching image keys, else an error).

Usage::

    python -m benchmarks.compare_runs --a out/cpu-study/run/personalized \\
        --b out/cpu-study/run-deploy/personalized --label deployment-vs-inprocess

Several folders per side are several seeds: the i-th of ``--a`` pairs with the
i-th of ``--b`` and the difference is the mean over seeds, with an interval
that resamples seeds and images
(:func:`common.detector.froc.pooled_paired_cpm_difference`), e.g. a regime of
one three-seed study against another study's::

    python -m benchmarks.compare_runs --a out/study/seed-{0,1,2}/local-only \\
        --b out/study-eps2/seed-{0,1,2}/personalized-dp --label dp-eps2-vs-local

A side may also be a cross-validation run's out-of-fold file
(``oof_predictions.json`` of ``mammofed-sim crossval``, or
``oof_predictions-detector.json``, the detector alone where the run also
re-scored): one "site", ``cv``, whose images are every out-of-fold image, e.g.
a recipe at 60 epochs against the same folds at 25::

    python -m benchmarks.compare_runs \\
        --a out/mias-rs-seed0/oof_predictions-detector.json \\
        --b out/mias-e60-seed0/oof_predictions.json --label mias-60-vs-25-epochs

``--cases REGEX`` keeps only the images of the women whose case (patient)
matches (``re.search``), e.g. the confirmation study's new test women, who
are numbered from 1000 on (``configs/simulation/study-confirm.yaml``)::

    python -m benchmarks.compare_runs --cases 'PH-[BCD]-01' \
        --a out/confirm/seed-{0,1,2}/local-only \
        --b out/confirm/seed-{0,1,2}/personalized-dp+tuned+local

``--also ROOT=OTHER`` adds, to every run under ``ROOT``, the images the same
regime scored under ``OTHER`` (the same relative path): the same models on
another test set, e.g. the two holdouts of one study, which train on the same
women with the same seeds (so their models are the same to the bit) and test
on different new women (:func:`join_other_test_set`)::

    python -m benchmarks.compare_runs --cases='-0[34][0-9]{3}$' \
        --also out/recheck-h2=out/recheck-h1 \
        --a out/recheck-h2/seed-{0,1,2}/local-only \
        --b out/recheck-h2/seed-{0,1,2}/personalized-ssl+tuned+local-unless-fewshot

``--mid`` adds the share of the gap ``b - a`` that a third regime closes,
e.g. semi-supervision between its labeled-only and all-labels versions
(``mid-closes-gap-<class>`` lines, :func:`gap_closed`)::

    python -m benchmarks.compare_runs --cases 'PH-[BCD]-01' \
        --a out/confirm-ssl/seed-{0,1,2}/personalized \
        --mid out/confirm-ssl/seed-{0,1,2}/personalized-ssl \
        --b out/confirm-ssl/seed-{0,1,2}/personalized-all-labels

One JSON line per site and class in ``benchmarks/results/compare_runs.jsonl``:
``b-minus-a-cpm-<class>`` with the paired 95% interval, both CPMs and
sensitivities at 1 FP/image (means over runs), and the wall time of each
run's regime (``run.json`` ``seconds``) where recorded.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from statistics import fmean
from typing import Any

from benchmarks.common import emit, rounded
from common.detector.froc import (
    FrocImage,
    froc_class,
    pooled_gap_closed,
    pooled_paired_cpm_difference,
)
from common.keys import CLASSES
from common.wire import runfolder as RF
from simulation.report import load_detections

BENCH = "compare_runs"
#: the "site" of a cross-validation run's out-of-fold images
CV_SITE = "cv"


def load_run(path: Path) -> dict[str, list[FrocImage]]:
    """Per site, the scored test images of one run.

    ``path``: a regime folder (its ``detections.json``), or a crossval run's
    out-of-fold file (site :data:`CV_SITE`; any file, or a path ending in
    ``.json``; ``.json.gz`` is read through gzip).

    Raises:
        ValueError: unreadable or malformed file (named).
    """
    if path.is_file() or path.suffix == ".json":
        from benchmarks.ensemble import load_oof

        return {CV_SITE: load_oof(path)}
    return load_detections(path / RF.DETECTIONS_JSON)


def _model_files(regime_dir: Path) -> dict[str, bytes]:
    """The model files a regime folder keeps (``model.pt``, ``models/*.pt``)."""
    files = [regime_dir / "model.pt", *sorted((regime_dir / "models").glob("*.pt"))]
    return {
        str(f.relative_to(regime_dir)): f.read_bytes() for f in files if f.is_file()
    }


def join_other_test_set(
    run: dict[str, list[FrocImage]], path: Path, root: Path, other: Path
) -> dict[str, list[FrocImage]]:
    """``run`` (the regime folder ``path`` under ``root``) joined with the
    images the same regime scored under ``other``.

    For two runs of one scenario's models on two test sets (a study's two
    holdouts): the regime folder at the same relative path under ``other`` is
    read and each site's images are added to ``run``'s. Where the folders
    keep model files (``model.pt``, ``models/*.pt``: trained regimes; an
    ensemble keeps none, its members are checked where they are compared),
    both must hold the same files with the same bytes, or the two test sets
    were not scored by the same models.

    Raises:
        ValueError: ``path`` is not under ``root``, the other folder is
            missing, its model files differ, or an image key is in both.
    """
    try:
        rel = path.relative_to(root)
    except ValueError as exc:
        raise ValueError(f"--also: {path} is not under {root}") from exc
    there = other / rel
    if not there.is_dir():
        raise ValueError(f"--also: {there} (for {path}) is not a regime folder")
    mine, theirs = _model_files(path), _model_files(there)
    if mine != theirs:
        differ = sorted(
            k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)
        )
        raise ValueError(
            f"--also: {path} and {there} do not keep the same models "
            f"(differ: {differ}); their test sets were scored by different models"
        )
    extra = load_run(there)
    joined = {site: list(images) for site, images in run.items()}
    for site, images in extra.items():
        have = {im.key for im in joined.get(site, [])}
        clash = sorted(have & {im.key for im in images})
        if clash:
            raise ValueError(
                f"--also: {path} and {there} both score image {clash[0]!r} "
                f"of site {site}: not two test sets"
            )
        joined[site] = joined.get(site, []) + list(images)
    return joined


def _seconds(regime_dir: Path) -> float | None:
    """The regime's wall time from its run's ``run.json``, if recorded."""
    meta = regime_dir.parent / RF.RUN_JSON
    if not meta.is_file():
        return None
    return RF.read_record(RF.StudyRun, meta).seconds.get(regime_dir.name)


def only_cases(
    run: dict[str, list[FrocImage]], pattern: str, where: Path
) -> dict[str, list[FrocImage]]:
    """``run`` with only the images whose case (woman) matches ``pattern``.

    An image without a case is matched by its key. Sites left without an
    image are dropped.

    Raises:
        ValueError: ``pattern`` matches no image of the run (named).
    """
    rx = re.compile(pattern)
    kept = {
        site: [im for im in images if rx.search(im.case or im.key)]
        for site, images in run.items()
    }
    kept = {site: images for site, images in kept.items() if images}
    if not kept:
        raise ValueError(f"{where}: --cases {pattern!r} matches no scored image")
    return kept


def _load_sides(
    sides: dict[str, Path | list[Path]],
    cases: str | None,
    also: tuple[Path, Path] | None = None,
) -> tuple[list[list[dict[str, list[FrocImage]]]], list[str]]:
    """Each side's runs (:func:`load_run`, joined with ``also``'s other test
    set by :func:`join_other_test_set`, cut to ``cases``) and the sites all
    score.

    Raises:
        ValueError: sides with different numbers of runs, an empty side, or no
            site scored in every run.
    """
    runs = {k: v if isinstance(v, list) else [v] for k, v in sides.items()}
    counts = {k: len(v) for k, v in runs.items()}
    if len(set(counts.values())) != 1 or not min(counts.values()):
        said = ", ".join(f"{k} has {n} runs" for k, n in counts.items())
        raise ValueError(f"{said}: not paired")
    loaded = []
    for side in runs.values():
        d = [load_run(r) for r in side]
        if also is not None:
            d = [join_other_test_set(x, r, *also) for x, r in zip(d, side, strict=True)]
        if cases is not None:
            d = [only_cases(x, cases, r) for x, r in zip(d, side, strict=True)]
        loaded.append(d)
    every = [x for d in loaded for x in d]
    common = sorted(set.intersection(*(set(x) for x in every)))
    if not common:
        paths = [r for side in runs.values() for r in side]
        sites = [f"{r}: {sorted(x)}" for r, x in zip(paths, every, strict=True)]
        raise ValueError("no site scored in every run: " + "; ".join(sites))
    return loaded, common


def gap_closed(
    a: Path | list[Path],
    mid: Path | list[Path],
    b: Path | list[Path],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    cases: str | None = None,
    also: tuple[Path, Path] | None = None,
) -> list[dict[str, Any]]:
    """Per (site, class): the share of the gap ``b - a`` that ``mid`` closes.

    E.g. ``a`` a regime on its labeled women, ``mid`` its semi-supervised
    version, ``b`` the same regime with every woman labeled, all on the same
    test women (and seeds, in the same order): ``(CPM(mid) - CPM(a)) /
    (CPM(b) - CPM(a))`` with the interval of
    :func:`common.detector.froc.pooled_gap_closed` (women and seeds
    resampled). ``closed`` is NaN when the gap is not above zero.

    Raises:
        ValueError: as :func:`compare`, for three sides.
    """
    (da, dm, db), common = _load_sides({"--a": a, "--mid": mid, "--b": b}, cases, also)
    rows = []
    for site in common:
        for label, cls in enumerate(CLASSES):
            xa, xm, xb = ([d[site] for d in side] for side in (da, dm, db))
            g = pooled_gap_closed(xa, xm, xb, label, n_boot=n_boot, seed=seed)
            rows.append(
                {
                    "site": site,
                    "class": cls,
                    "cpm_a": rounded(g["cpm_low"]),
                    "cpm_mid": rounded(g["cpm_mid"]),
                    "cpm_b": rounded(g["cpm_high"]),
                    "closed": g["closed"],
                    "closed_ci95": [rounded(x) for x in g["ci95"]],
                    "undefined_resamples": g["undefined"],
                    "n_images": len(xa[0]),
                    "n_runs": len(xa),
                }
            )
    return rows


def compare(
    a: Path | list[Path],
    b: Path | list[Path],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    cases: str | None = None,
    also: tuple[Path, Path] | None = None,
) -> list[dict[str, Any]]:
    """Per (site, class): CPM of ``a`` and ``b`` and the paired ``b - a``.

    ``a`` and ``b``: one run each (:func:`load_run`: a regime folder or an
    out-of-fold file), or one per seed (same count; the CPMs, sensitivities
    and the difference are then means over seeds). ``cases``: a regular
    expression; only the women it matches are scored (:func:`only_cases`).
    ``also``: ``(root, other)``, each run's images joined with the same
    regime's under ``other`` (:func:`join_other_test_set`).

    Raises:
        ValueError: a site's two image sets differ (not the same test images),
            no site is scored in every run, the two sides have different
            numbers of runs, or ``cases`` matches nothing in a run.
    """
    (da, db), common = _load_sides({"--a": a, "--b": b}, cases, also)
    rows = []
    for site in common:
        for label, cls in enumerate(CLASSES):
            xa, xb = [d[site] for d in da], [d[site] for d in db]
            # one run a side is the plain paired bootstrap (the same function)
            r = pooled_paired_cpm_difference(xa, xb, label, n_boot=n_boot, seed=seed)
            diff, ci, cpm_a, cpm_b = r["diff"], r["ci95"], r["cpm_a"], r["cpm_b"]
            sens_a, sens_b = (
                fmean(froc_class(x, label).sens_at[1.0] for x in side)
                for side in (xa, xb)
            )
            rows.append(
                {
                    "site": site,
                    "class": cls,
                    "cpm_a": rounded(cpm_a),
                    "cpm_b": rounded(cpm_b),
                    "sens_at_1fp_a": rounded(sens_a),
                    "sens_at_1fp_b": rounded(sens_b),
                    "diff": diff,
                    "paired_ci95": [rounded(x) for x in ci],
                    "n_images": len(xa[0]),
                    "n_runs": len(xa),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Emit the paired comparison of two regime folders."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--a",
        type=Path,
        nargs="+",
        required=True,
        help="regime folder or crossval oof file (baseline), or one per seed",
    )
    p.add_argument(
        "--b",
        type=Path,
        nargs="+",
        required=True,
        help="regime folder or crossval oof file (compared), or one per seed "
        "(same order as --a)",
    )
    p.add_argument(
        "--mid",
        type=Path,
        nargs="+",
        default=None,
        help="also: the share of the gap b - a that these runs close (e.g. a "
        "semi-supervised regime between its labeled-only and all-labels "
        "versions), one per seed in --a's order",
    )
    p.add_argument("--label", default="b-vs-a", help="name of the comparison")
    p.add_argument(
        "--cases",
        default=None,
        help="regular expression: score only the women (cases) it matches",
    )
    p.add_argument(
        "--also",
        default=None,
        metavar="ROOT=OTHER",
        help="join every run under ROOT with the same regime's images under "
        "OTHER: the same models on another test set (model files checked)",
    )
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    also = None
    if args.also is not None:
        root, sep, other = args.also.partition("=")
        if not sep or not root or not other:
            p.error(f"--also: expected ROOT=OTHER, got {args.also!r}")
        also = (Path(root), Path(other))
    ctx = {
        "comparison": args.label,
        "a": [str(x) for x in args.a] if len(args.a) > 1 else str(args.a[0]),
        "b": [str(x) for x in args.b] if len(args.b) > 1 else str(args.b[0]),
        "seconds_a": _seconds(args.a[0]) if len(args.a) == 1 else None,
        "seconds_b": _seconds(args.b[0]) if len(args.b) == 1 else None,
    }
    if args.cases is not None:
        ctx["cases"] = args.cases
    if also is not None:
        ctx["also"] = args.also
    for row in compare(args.a, args.b, n_boot=args.n_boot, cases=args.cases, also=also):
        emit(
            BENCH,
            f"b-minus-a-cpm-{row['class']}",
            row.pop("diff"),
            "cpm",
            results_dir=args.results,
            **row,
            **ctx,
        )
    if args.mid is not None:
        ctx["mid"] = [str(x) for x in args.mid]
        for row in gap_closed(
            args.a, args.mid, args.b, n_boot=args.n_boot, cases=args.cases, also=also
        ):
            emit(
                BENCH,
                f"mid-closes-gap-{row['class']}",
                row.pop("closed"),
                "fraction",
                results_dir=args.results,
                **row,
                **ctx,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
