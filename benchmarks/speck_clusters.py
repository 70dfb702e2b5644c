"""Calcification clusters from specks at the stored resolution, on mini-MIAS CV.

``model.speck_clusters`` replaces the detector's calcification findings by the
clusters of specks found at the file's stored resolution
(:mod:`common.imaging.specks`). It trains nothing, so a cross-validation's
out-of-fold detections measure it exactly: each run's calcification findings
are replaced (masses untouched) and the result is paired with the run itself
on the same images, pooled over runs (seeds) and women.

Figures (one JSON line each, ``benchmarks/results/speck_clusters.jsonl``):

``cluster-cpm-detector`` / ``cluster-cpm-specks``
    mean over runs, with the sensitivity at 1 FP/image;
``cluster-cpm-specks-minus-detector``
    pooled paired difference with its 95% interval (runs and women resampled);
``cluster-cpm-specks-nested``
    the finder's settings (``k``, ``radius_mm``, ``ref_rank``) chosen from a
    small grid on the other folds' images and applied to each fold (the
    run's own fold numbers), so no figure saw the settings it is scored
    with; women-bootstrap interval;
``mass-cpm-unchanged``
    1 when every run's masses score the same before and after (a check);
``find-specks-seconds-per-image``
    time of :func:`common.imaging.specks.find_specks` per image, with the
    baseline in the same run: reading and standardizing the same files;
``cluster-cpm-specks-ceiling``
    the most any re-scoring of the finder's marks could reach: the CPM with
    every mark that hits a cluster ranked above every false one (the marks
    themselves unchanged), beside how many clusters some mark reaches, how
    many hold at least one / three specks within the hit radius, how many
    have a speck among their image's ten brightest, and per cluster the
    FP/image at which the finder finds it (``null``: never) with the rank of
    its brightest speck in its image;
    with ``--results``, ``errors-calcification-specks.png`` beside it: the
    clusters missed at 1 FP/image and the top false marks (thumbnails of
    the model-space image, :func:`common.detector.errors.plot_error_gallery`).

``--checkpoint CK --site-caches C1 C2 ...`` measures a trained model on
other sites' test women instead (the phantom's vendors, say): per site, the
model's cluster CPM with its own clusters and with the speck clusters,
paired over the same images (``site-cluster-cpm-specks-minus-detector``),
masses checked unchanged. The demo's H base model on the four vendors::

    python -m benchmarks.speck_clusters --checkpoint models/demo-base-h.pt \\
        --site-caches out/demo/data/caches/{A,B,C,D} --results $R/mias_04_specks

(the caches ingested with ``specks: true``).

Usage (the stop-44 baseline's three seeds)::

    R=benchmarks/results
    python -m benchmarks.speck_clusters --cache out/mini-mias/cache \\
        --oof $R/mias_04_pretrain/oof_predictions-base-seed{0,1,2}.json.gz \\
        --results $R/mias_04_specks

The cache must be ingested with ``specks: true`` (configs/sites/mini-mias.yaml).
Each run's replaced out-of-fold file is written gzipped beside the figures
(``oof_predictions-specks-<name>.json.gz``) for ``benchmarks.compare_runs``.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

import numpy as np

from benchmarks.common import emit, rounded
from benchmarks.ensemble import load_oof
from benchmarks.froc_ceiling import lesion_reach, oracle_ranked
from common.detector.engine import with_speck_clusters_images
from common.detector.errors import class_errors, plot_error_gallery
from common.detector.froc import FrocImage, froc_class, pooled_paired_cpm_difference
from common.imaging.cache import SiteCache
from common.imaging.image_io import read_any
from common.imaging.research_image import load_grey01
from common.imaging.specks import find_specks
from common.keys import CALCIFICATION, CLASS_TO_LABEL, MASS

BENCH = "speck_clusters"
CALC, MASS_LABEL = CLASS_TO_LABEL[CALCIFICATION], CLASS_TO_LABEL[MASS]
#: The nested selection's grid: (k, radius_mm, ref_rank).
GRID = tuple(itertools.product((2, 3, 4), (5.0, 8.0), (10, 30)))


def cache_key(key: str) -> str:
    """The cache key of an out-of-fold image key (``<site>/<cache key>``)."""
    return key.rsplit("/", 1)[-1]


def load_folds(path: Path) -> dict[str, int]:
    """``{image key: fold}`` of an out-of-fold file (``-1`` when not recorded)."""
    opener: Any = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        rows = json.load(fh)
    return {str(r["key"]): int(r.get("fold", -1)) for r in rows}


def replace_clusters(
    images: Sequence[FrocImage],
    specks: dict[str, np.ndarray],
    *,
    k: int,
    radius_mm: float,
    ref_rank: int,
) -> list[FrocImage]:
    """``images`` whose calcification findings are the speck clusters only
    (:func:`common.imaging.specks.with_speck_clusters` at these settings)."""
    settings = {"k": k, "radius_mm": radius_mm, "ref_rank": ref_rank}
    return with_speck_clusters_images(images, specks.get, "speck clusters", **settings)


def nested(
    images: Sequence[FrocImage], folds: dict[str, int], specks: dict[str, np.ndarray]
) -> tuple[list[FrocImage], list[tuple[int, float, int]]]:
    """Out-of-fold images with the settings chosen on the other folds."""
    out: list[FrocImage] = []
    chosen = []
    for f in sorted(set(folds.values())):
        train = [im for im in images if folds[im.key] != f]
        test = [im for im in images if folds[im.key] == f]
        best = max(
            GRID,
            key=lambda g: (
                froc_class(
                    replace_clusters(
                        train, specks, k=g[0], radius_mm=g[1], ref_rank=g[2]
                    ),
                    CALC,
                ).cpm
            ),
        )
        chosen.append(best)
        out += replace_clusters(
            test, specks, k=best[0], radius_mm=best[1], ref_rank=best[2]
        )
    return out, chosen


def _ceiling(
    images: Sequence[FrocImage],
    specks: dict[str, np.ndarray],
    cache: SiteCache,
    results: Path | None,
    ctx: dict[str, Any],
) -> None:
    """The ``cluster-cpm-specks-ceiling`` line and, with ``results``, the gallery."""
    rows = lesion_reach(images, specks, CALC)
    best = froc_class(oracle_ranked(images, CALC), CALC)
    emit(
        BENCH,
        "cluster-cpm-specks-ceiling",
        rounded(best.cpm),
        "cpm",
        results_dir=results,
        cpm_as_scored=rounded(froc_class(images, CALC).cpm),
        n_lesions=len(rows),
        reached_by_a_mark=sum(r["fp_per_image"] is not None for r in rows),
        with_a_speck_in_reach=sum(r["specks"] >= 1 for r in rows),
        with_three_specks_in_reach=sum(r["specks"] >= 3 for r in rows),
        brightest_speck_in_image_top10=sum(
            r["rank_in_image"] is not None and r["rank_in_image"] < 10 for r in rows
        ),
        per_lesion=rows,
        **ctx,
    )
    if results is not None:
        errors = class_errors(images, CALC)
        plot_error_gallery(
            errors,
            lambda key: cache.load_pixels(cache_key(key)),
            results / "errors-calcification-specks.png",
            title="speck clusters, mini-MIAS out-of-fold",
        )


def _write_gz(path: Path, images: Sequence[FrocImage], folds: dict[str, int]) -> None:
    rows = [{**im.to_json(), "fold": folds.get(im.key, -1)} for im in images]
    with gzip.open(path, "wt") as fh:
        json.dump(rows, fh)


def _timing(cache: SiteCache, keys: Sequence[str], n: int) -> tuple[float, float]:
    """Seconds per image: (read + standardize, find_specks), on ``n`` images."""
    root = cache.read_site_root()
    if root is None:
        raise ValueError(f"{cache.root}: no site_root.txt: cannot time the reads")
    t_read = t_specks = 0.0
    done = 0
    for key in keys[:n]:
        e = cache.read_entry(key)
        t0 = time.perf_counter()
        img = read_any(
            root / e.source, working_spacing_mm=e.working_spacing_mm, **e.options
        )
        t1 = time.perf_counter()
        unit = load_grey01(root / e.source)
        t2 = time.perf_counter()
        find_specks(unit, img.geometry, e.meta.stored_spacing_mm)
        t3 = time.perf_counter()
        t_read += t1 - t0
        t_specks += t3 - t2
        done += 1
    return t_read / done, t_specks / done


def sites(
    checkpoint: Path, caches: Sequence[Path], results: Path | None, n_boot: int
) -> None:
    """Per site cache: the model's test women with and without speck clusters."""
    import torch

    from client.export import load_detectors
    from common.detector.engine import detect_dataset
    from common.detector.froc import paired_cpm_difference
    from common.imaging.data import SiteDataset

    (model, ck, std), *_ = load_detectors(checkpoint, torch.device("cpu"))
    if std is not None:
        raise SystemExit(f"{checkpoint}: a model with a site standardizer")
    for cache in caches:
        site = SiteDataset(cache, model_spacing_mm=ck.model_config.working_spacing_mm)
        own = detect_dataset(model, site.view("test"), "cpu")
        new = with_speck_clusters_images(own, site.cache.load_specks, str(cache))
        same_mass = froc_class(own, MASS_LABEL).cpm == froc_class(new, MASS_LABEL).cpm
        diff, ci = paired_cpm_difference(own, new, CALC, n_boot=n_boot)
        a, b = froc_class(own, CALC), froc_class(new, CALC)
        emit(
            BENCH,
            "site-cluster-cpm-specks-minus-detector",
            rounded(diff),
            "cpm",
            results_dir=results,
            site=str(cache),
            checkpoint=str(checkpoint),
            cpm_detector=rounded(a.cpm),
            cpm_specks=rounded(b.cpm),
            paired_ci95=[rounded(x) for x in ci],
            n_lesions=a.n_lesions,
            n_images=a.n_images,
            mass_unchanged=bool(same_mass),
        )


def main(argv: list[str] | None = None) -> int:
    """Emit the figures of the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path)
    p.add_argument("--oof", type=Path, nargs="+")
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--site-caches", type=Path, nargs="+")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--time-images", type=int, default=40)
    args = p.parse_args(argv)
    if args.checkpoint is not None or args.site_caches is not None:
        if args.checkpoint is None or not args.site_caches:
            p.error("--checkpoint and --site-caches go together")
        sites(args.checkpoint, args.site_caches, args.results, args.n_boot)
        return 0
    if args.cache is None or not args.oof:
        p.error("--cache and --oof (or --checkpoint and --site-caches)")
    cache = SiteCache(args.cache)
    runs = [load_oof(f) for f in args.oof]
    keys = sorted({im.key for im in runs[0]})
    specks: dict[str, np.ndarray] = {}
    for key in keys:
        s = cache.load_specks(cache_key(key))
        if s is None:
            raise SystemExit(
                f"{args.cache}: image {cache_key(key)} has no specks: ingest with "
                "'specks: true' (configs/sites/mini-mias.yaml)"
            )
        specks[key] = s
    ctx = {"oof": [str(f) for f in args.oof], "cache": str(args.cache)}
    replaced = []
    for f, run in zip(args.oof, runs, strict=True):
        # the specks loaded (and checked) above, not read again per run
        new = with_speck_clusters_images(run, specks.get, str(args.cache))
        replaced.append(new)
        if args.results is not None:
            name = Path(str(f.name).replace(".gz", "")).stem
            name = name.replace("oof_predictions-", "").replace("oof_predictions", "")
            args.results.mkdir(parents=True, exist_ok=True)
            _write_gz(
                args.results / f"oof_predictions-specks-{name or 'run'}.json.gz",
                new,
                load_folds(f),
            )
    same_mass = all(
        froc_class(a, MASS_LABEL).cpm == froc_class(b, MASS_LABEL).cpm
        for a, b in zip(runs, replaced, strict=True)
    )
    for name, side in (("detector", runs), ("specks", replaced)):
        res = [froc_class(x, CALC) for x in side]
        emit(
            BENCH,
            f"cluster-cpm-{name}",
            rounded(fmean(r.cpm for r in res)),
            "cpm",
            results_dir=args.results,
            per_run=[rounded(r.cpm) for r in res],
            sens_at_1fp=rounded(fmean(r.sens_at[1.0] for r in res)),
            n_lesions=res[0].n_lesions,
            n_images=res[0].n_images,
            **ctx,
        )
    d = pooled_paired_cpm_difference(runs, replaced, CALC, n_boot=args.n_boot)
    emit(
        BENCH,
        "cluster-cpm-specks-minus-detector",
        rounded(d["diff"]),
        "cpm",
        results_dir=args.results,
        paired_ci95=[rounded(x) for x in d["ci95"]],
        n_runs=len(runs),
        **ctx,
    )
    folds = load_folds(args.oof[0])
    nested_images, chosen = nested(runs[0], folds, specks)
    r = froc_class(nested_images, CALC, n_boot=args.n_boot)
    emit(
        BENCH,
        "cluster-cpm-specks-nested",
        rounded(r.cpm),
        "cpm",
        results_dir=args.results,
        ci95=[rounded(x) for x in r.cpm_ci] if r.cpm_ci else None,
        sens_at_1fp=rounded(r.sens_at[1.0]),
        chosen_per_fold=[list(c) for c in chosen],
        grid=[list(g) for g in GRID],
        **ctx,
    )
    emit(
        BENCH,
        "mass-cpm-unchanged",
        int(same_mass),
        "bool",
        results_dir=args.results,
        **ctx,
    )
    _ceiling(replaced[0], specks, cache, args.results, ctx)
    t_read, t_specks = _timing(cache, [cache_key(k) for k in keys], args.time_images)
    emit(
        BENCH,
        "find-specks-seconds-per-image",
        rounded(t_specks),
        "s",
        results_dir=args.results,
        baseline_read_and_standardize_s=rounded(t_read),
        n_images=min(args.time_images, len(keys)),
        **ctx,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
