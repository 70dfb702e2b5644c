"""How good would a site's pseudo boxes be? Its model's precision on unlabeled women.

Self-training (STAC, Unbiased Teacher, Noisy Student) turns a teacher's
confident detections on unlabeled images into boxes to train on. It can only
help where those boxes are mostly right. This benchmark measures that for a
study's federated model (the model a site's teacher tracks): for each seed
and site, the site's final model of ``--regime`` (its last global round plus
its personal layers, exported as the site exports it,
``client.export.export_model``) detects on the site's
**unlabeled training women**; every detection at or above a threshold is a
pseudo box, scored against the scenario's complete annotations of those
women (the oracle cache, which the site never sees) with the FROC hit rule.
The baseline, same model and thresholds, is the site's **test women**, whose
labels the study scores on.

Figures per seed (and pooled over seeds), site, class, view and threshold:
pseudo boxes per image, precision (pseudo boxes that hit a lesion / all;
a second box on a found lesion counts as wrong) and recall (lesions found
by at least one pseudo box).

Usage::

    python -m benchmarks.pseudo_precision --study out/study35-ssl \\
        --data out/study35-data --regime personalized-ssl --site C --site D

One JSON line per figure in ``benchmarks/results/pseudo_precision.jsonl``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import emit
from client.export import export_model
from common.detector.checkpoint import load_model
from common.detector.engine import detect_dataset
from common.detector.froc import HIT, FrocImage, match_image_lesions
from common.imaging.data import SiteDataset
from common.keys import CLASSES
from common.wire import runfolder as RF
from common.wire.federation import load_federation_config
from simulation.run import trained_in

log = logging.getLogger(__name__)

BENCH = "pseudo_precision"
VIEWS = ("unlabeled", "test")


@dataclass
class Tally:
    """Pseudo boxes of one class at one threshold, and what they hit."""

    images: int = 0
    boxes: int = 0
    hits: int = 0
    lesions: int = 0
    found: int = 0

    def add(self, other: Tally) -> None:
        """Add ``other``'s counts to these."""
        for k in ("images", "boxes", "hits", "lesions", "found"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def figures(self) -> dict[str, float]:
        """``per_image``, ``precision`` and ``recall`` (NaN where undefined)."""
        nan = float("nan")
        return {
            "per_image": self.boxes / self.images if self.images else nan,
            "precision": self.hits / self.boxes if self.boxes else nan,
            "recall": self.found / self.lesions if self.lesions else nan,
        }


@dataclass
class SiteTallies:
    """``{(view, class, threshold): Tally}`` of one site (one seed or pooled)."""

    by_key: dict[tuple[str, str, float], Tally] = field(default_factory=dict)

    def get(self, key: tuple[str, str, float]) -> Tally:
        """The tally of ``key`` (created empty)."""
        return self.by_key.setdefault(key, Tally())


def tally(
    images: Sequence[FrocImage], truth: dict[str, FrocImage], label: int, thr: float
) -> Tally:
    """Pseudo boxes of class ``label`` at ``thr`` on ``images``, scored on ``truth``.

    ``truth[key]`` carries the complete annotations of image ``key`` (its
    ``gt_*`` and ``ignore_boxes``); the detections are ``images``'.
    """
    t = Tally()
    for im in images:
        gt = truth[im.key]
        keep = im.det_scores >= thr
        scored = FrocImage(
            key=im.key,
            spacing_mm=im.spacing_mm,
            gt_boxes=gt.gt_boxes,
            gt_labels=gt.gt_labels,
            ignore_boxes=gt.ignore_boxes,
            det_boxes=im.det_boxes[keep],
            det_scores=im.det_scores[keep],
            det_labels=im.det_labels[keep],
            case=im.case,
        )
        _, outcomes, hit_by = match_image_lesions(scored, label)
        t.images += 1
        t.boxes += len(outcomes)
        t.hits += int((outcomes == HIT).sum())
        t.lesions += len(hit_by)
        t.found += int((hit_by >= 0).sum())
    return t


def _truth(oracle_cache: Path, seed: int) -> dict[str, FrocImage]:
    """Every image of the oracle cache as a :class:`FrocImage` of its labels."""
    ds = SiteDataset(oracle_cache, seed=seed)
    out = {}
    for r in ds.records:
        out[r.key] = FrocImage(
            key=r.key,
            spacing_mm=float(r.spacing_mm),
            gt_boxes=np.asarray(r.boxes, dtype=np.float64).reshape(-1, 4),
            gt_labels=np.asarray(r.labels, dtype=np.int64),
            ignore_boxes=np.asarray(r.ignore, dtype=np.float64).reshape(-1, 4),
            det_boxes=np.zeros((0, 4), np.float32),
            det_scores=np.zeros(0, np.float32),
            det_labels=np.zeros(0, np.int64),
            case=r.patient_id,
        )
    return out


def measure_seed(
    run: Path,
    data: Path,
    regime: str,
    sites: Sequence[str],
    thresholds: Sequence[float],
    work: Path,
) -> dict[str, SiteTallies]:
    """The tallies of each site of one seed's run folder."""
    seed = load_federation_config(run / RF.CONFIGS_DIR / "federation.yaml").seed
    src = trained_in(run, regime) / regime
    out: dict[str, SiteTallies] = {}
    for site in sites:
        ckpt = work / f"{run.name}-{site}.pt"
        export_model(
            src / RF.SERVER_DIR / RF.CHECKPOINT_DIR,
            ckpt,
            site=site,
            state_dir=src / RF.SITE_STATE_DIR,
        )
        model, _ = load_model(ckpt)
        truth = _truth(data / "oracle" / site, seed)
        ds = SiteDataset(data / "cache" / site, seed=seed)
        tallies = SiteTallies()
        for view in VIEWS:
            items = ds.view(view)
            if len(items) == 0:
                log.info("%s site %s: no %s images, view skipped", run, site, view)
                continue
            images = detect_dataset(model, items, "cpu")
            missing = sorted({im.key for im in images} - set(truth))
            if missing:
                raise ValueError(
                    f"{data / 'oracle' / site}: no image {missing[0]!r} of "
                    f"{data / 'cache' / site} ({len(missing)} missing): not the "
                    "same scenario's oracle cache"
                )
            for label, name in enumerate(CLASSES):
                for thr in thresholds:
                    tallies.get((view, name, thr)).add(tally(images, truth, label, thr))
        out[site] = tallies
    return out


def _emit(
    tallies: SiteTallies,
    site: str,
    seed: str,
    ctx: dict[str, object],
    results: Path | None,
) -> None:
    for (view, name, thr), t in sorted(tallies.by_key.items()):
        for figure, value in t.figures().items():
            if np.isnan(value):  # no box (precision) or no lesion (recall)
                continue
            emit(
                BENCH,
                f"{view}-{name}-{figure}",
                round(value, 4),
                "fraction" if figure != "per_image" else "boxes/image",
                results_dir=results,
                site=site,
                seed=seed,
                threshold=thr,
                images=t.images,
                boxes=t.boxes,
                hits=t.hits,
                lesions=t.lesions,
                found=t.found,
                **ctx,
            )


def main(argv: list[str] | None = None) -> int:
    """Measure and emit the pseudo boxes' precision and recall."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", type=Path, required=True, help="folder of seed-<s>/")
    p.add_argument("--data", type=Path, required=True, help="the study's --data")
    p.add_argument("--regime", default="personalized-ssl")
    p.add_argument("--site", action="append", required=True, dest="sites")
    p.add_argument(
        "--threshold", type=float, action="append", dest="thresholds",
        help="score thresholds (default 0.3, 0.4, 0.5)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    thresholds = args.thresholds or [0.3, 0.4, 0.5]
    if any(not 0.0 <= t <= 1.0 for t in thresholds):
        p.error(f"--threshold: scores are in [0, 1], got {thresholds}")
    runs = sorted(args.study.glob("seed-*"), key=lambda q: int(q.name.split("-")[1]))
    if not runs:
        p.error(f"--study {args.study}: no seed-<s> folder")
    torch.set_num_threads(args.threads)
    ctx: dict[str, object] = {"study": str(args.study), "regime": args.regime}
    pooled = {s: SiteTallies() for s in args.sites}
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            per_site = measure_seed(
                run, args.data, args.regime, args.sites, thresholds, Path(tmp)
            )
            for site, tallies in per_site.items():
                _emit(tallies, site, run.name, ctx, args.results)
                for key, t in tallies.by_key.items():
                    pooled[site].get(key).add(t)
    for site, tallies in pooled.items():
        _emit(tallies, site, "pooled", ctx, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
