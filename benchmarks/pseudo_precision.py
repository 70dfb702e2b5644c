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
import dataclasses
import logging
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
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


#: ``{(view, class, threshold): Tally}`` of one site (one seed or pooled).
Tallies = dict[tuple[str, str, float], Tally]


def tally(images: Sequence[FrocImage], label: int, thr: float) -> Tally:
    """Pseudo boxes of class ``label`` at ``thr`` on ``images``, scored.

    ``images`` carry the complete annotations (``gt_*``, ``ignore_boxes``) and
    the model's detections; a detection at or above ``thr`` is a pseudo box.
    """
    t = Tally()
    for im in images:
        keep = im.det_scores >= thr
        scored = dataclasses.replace(
            im,
            det_boxes=im.det_boxes[keep],
            det_scores=im.det_scores[keep],
            det_labels=im.det_labels[keep],
        )
        _, outcomes, hit_by = match_image_lesions(scored, label)
        t.images += 1
        t.boxes += len(outcomes)
        t.hits += int((outcomes == HIT).sum())
        t.lesions += len(hit_by)
        t.found += int((hit_by >= 0).sum())
    return t


def _oracle_index(oracle_cache: Path, seed: int) -> tuple[SiteDataset, dict[str, int]]:
    """The oracle cache (every image labeled) and its record index by key."""
    ds = SiteDataset(oracle_cache, seed=seed)
    return ds, {r.key: i for i, r in enumerate(ds.records)}


def measure_seed(
    run: Path,
    data: Path,
    regime: str,
    sites: Sequence[str],
    thresholds: Sequence[float],
    work: Path,
) -> dict[str, Tallies]:
    """The tallies of each site of one seed's run folder."""
    seed = load_federation_config(run / RF.CONFIGS_DIR / "federation.yaml").seed
    src = trained_in(run, regime) / regime
    out: dict[str, Tallies] = {}
    for site in sites:
        ckpt = work / f"{run.name}-{site}.pt"
        export_model(
            src / RF.SERVER_DIR / RF.CHECKPOINT_DIR,
            ckpt,
            site=site,
            state_dir=src / RF.SITE_STATE_DIR,
        )
        model, _ = load_model(ckpt)
        oracle, index = _oracle_index(data / "oracle" / site, seed)
        ds = SiteDataset(data / "cache" / site, seed=seed)
        tallies: Tallies = defaultdict(Tally)
        for view in VIEWS:
            keys = [r.key for r in ds.view(view).records]
            if not keys:
                log.info("%s site %s: no %s images, view skipped", run, site, view)
                continue
            missing = [k for k in keys if k not in index]
            if missing:
                raise ValueError(
                    f"{data / 'oracle' / site}: no image {missing[0]!r} of "
                    f"{data / 'cache' / site} ({len(missing)} missing): not the "
                    "same scenario's oracle cache"
                )
            # the same images (the cache is keyed by content), with every label
            items = oracle.subset([index[k] for k in keys])
            images = detect_dataset(model, items, "cpu")
            for label, name in enumerate(CLASSES):
                for thr in thresholds:
                    tallies[(view, name, thr)].add(tally(images, label, thr))
        out[site] = tallies
    return out


def _emit(
    tallies: Tallies,
    site: str,
    seed: str,
    ctx: dict[str, object],
    results: Path | None,
) -> None:
    for (view, name, thr), t in sorted(tallies.items()):
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
    pooled: dict[str, Tallies] = {s: defaultdict(Tally) for s in args.sites}
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            per_site = measure_seed(
                run, args.data, args.regime, args.sites, thresholds, Path(tmp)
            )
            for site, tallies in per_site.items():
                _emit(tallies, site, run.name, ctx, args.results)
                for key, t in tallies.items():
                    pooled[site][key].add(t)
    for site, tallies in pooled.items():
        _emit(tallies, site, "pooled", ctx, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
