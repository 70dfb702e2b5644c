"""Which personal head? An ablation on a finished personalized run (issue #5).

The personalized regime (FedBN + FedPer) scores each site with the last global
round plus the site's personal state: its own normalization layers and a
personal head that it has fine-tuned head-only on its own labeled images every
round since round 1, never re-synchronized with the global head. On a site with
few labeled images that head can drift into over-fitting. This benchmark
re-scores the SAME finished run (same global body, same site norms, same test
images) with other heads:

* ``stored``: the run's own personal head (the regime's figure; a check that
  the benchmark reproduces ``metrics.json``);
* ``stored-site-stats``: the stored model with its BatchNorm running
  statistics re-estimated on the site's training images (never the test
  women; :func:`client.selection.reestimate_norm_stats`): what
  ``trainer.options.reestimate_norm`` (the ``personalized-stats`` regime)
  does after every round, here once at the end (docs/federation.md, "Fresh
  norm statistics");
* ``global``: the last global head with the site's norms (FedBN alone);
* ``global-ft<E>``: the last global head fine-tuned head-only for ``E`` epochs
  on the site's labeled images, with the same optimizer and sampler as the
  client's per-round FedPer step
  (:meth:`client.detector_trainer.DetectorTrainer._finetune_personal_head`
  with ``from_global``);
* ``norms-<S>`` (with ``--norms-from S``): the global head with site S's
  normalization layers instead of the site's own (do a small site's FedBN
  norms cost it?).

Every arm predicts the same test images, so each arm's difference to
``stored`` gets a PAIRED bootstrap interval
(:func:`common.detector.froc.paired_cpm_difference`). Nothing is written to the run's
site state.

Usage::

    python -m benchmarks.personal_head --run out/cpu-study/run \\
        --data out/adapt [--ft-epochs 1,3]

One JSON line per figure in ``benchmarks/results/personal_head.jsonl``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit, rounded
from client.detector_trainer import DetectorTrainer
from client.selection import reestimate_norm_stats
from client.site_model import PERSONAL_HEAD_PREFIX
from client.state import SiteState
from common.detector.engine import evaluate_detailed, seed_everything
from common.detector.froc import paired_cpm_difference
from common.keys import CLASSES, RESOLVED_CONFIG_YAML
from common.wire import runfolder as RF
from common.wire.federation import load_federation_config
from server.checkpoints import CheckpointStore
from simulation import regimes as R

BENCH = "personal_head"
STORED = "stored"
STORED_SITE_STATS = "stored-site-stats"
GLOBAL = "global"

log = logging.getLogger("benchmarks.personal_head")


def score_site(
    trainer: DetectorTrainer,
    shared: dict[str, Any],
    ft_epochs: list[int],
    *,
    n_boot: int,
    seed: int,
    other_norms: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every arm's :class:`common.detector.engine.EvalResult` on the site's test images.

    ``other_norms``: ``{site: its personal arrays}``; arm ``norms-<site>``
    scores the global head with THAT site's normalization layers.
    """
    out: dict[str, Any] = {}
    out[STORED] = trainer.evaluate_detailed(shared, n_boot=n_boot, seed=seed)
    view = trainer._view(trainer.opts.eval_view, train=False)
    trainer.compose(shared)
    reestimate_norm_stats(trainer.model, trainer.training_images(), trainer.device)
    out[STORED_SITE_STATS] = evaluate_detailed(
        trainer.model, view, trainer.device, n_boot=n_boot, seed=seed
    )
    trainer.compose(shared, personal_head=False)
    out[GLOBAL] = evaluate_detailed(
        trainer.model, view, trainer.device, n_boot=n_boot, seed=seed
    )
    for other, arrays in (other_norms or {}).items():
        trainer.site_model.compose(shared, personal_head=False, personal=arrays)
        trainer.model.to(trainer.device)
        out[f"norms-{other}"] = evaluate_detailed(
            trainer.model, view, trainer.device, n_boot=n_boot, seed=seed
        )
    for e in ft_epochs:
        trainer.compose(shared, personal_head=False)
        seed_everything(seed)
        head = trainer._finetune_personal_head(from_global=True, epochs=e)
        assert head is not None
        # the model as left by the fine-tuning, with the tuned head swapped in
        sd = trainer.model.state_dict()
        for k in trainer.head_keys:
            sd[k] = sd[k].new_tensor(head[PERSONAL_HEAD_PREFIX + k])
        trainer.model.load_state_dict(sd)
        out[f"global-ft{e}"] = evaluate_detailed(
            trainer.model, view, trainer.device, n_boot=n_boot, seed=seed
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """Re-score a finished personalized run with every head arm."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="mammofed-sim run folder")
    p.add_argument("--data", type=Path, required=True, help="its --data folder")
    p.add_argument("--regime", default=R.PERSONALIZED)
    p.add_argument("--ft-epochs", default="1,3", help="comma-separated epochs")
    p.add_argument(
        "--norms-from",
        default="",
        help="comma-separated sites whose norm layers are also tried on the others",
    )
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ft_epochs = [int(x) for x in args.ft_epochs.split(",") if x.strip()]
    args.norms_from = [x for x in args.norms_from.split(",") if x.strip()]
    server = args.run / args.regime / RF.SERVER_DIR
    fed = load_federation_config(server / RESOLVED_CONFIG_YAML)
    if not fed.personalization.personal_head:
        raise SystemExit(f"{server}: the run has no personal head")
    last = CheckpointStore(server / RF.CHECKPOINT_DIR).latest()
    if last is None:
        raise SystemExit(f"{server}: no checkpoint")
    state_dir = args.run / args.regime / RF.SITE_STATE_DIR
    for site in fed.sites:
        t0 = time.monotonic()
        trainer = DetectorTrainer(site, state_dir, fed, args.data / "cache" / site)
        if not trainer.dataset.indices(trainer.opts.eval_view):
            continue
        others = {
            o: SiteState(state_dir, o).load_personal()
            for o in fed.sites
            if o != site and o in args.norms_from
        }
        arms = score_site(
            trainer,
            dict(last.arrays),
            ft_epochs,
            n_boot=args.n_boot,
            seed=fed.seed,
            other_norms={o: a for o, a in others.items() if a is not None},
        )
        ctx = {
            "run": str(args.run),
            "regime": args.regime,
            "round": last.round,
            "site": site,
            "n_labeled": len(trainer.dataset.indices("labeled")),
            "n_test": len(arms[STORED].images),
            "seconds": round(time.monotonic() - t0, 1),
        }
        for arm, res in arms.items():
            for cls in CLASSES:
                r = res.per_class[cls]
                emit(
                    BENCH,
                    f"{arm}-cpm-{cls}",
                    r.cpm,
                    "cpm",
                    results_dir=args.results,
                    arm=arm,
                    ci95=None if r.cpm_ci is None else [rounded(x) for x in r.cpm_ci],
                    n_lesions=r.n_lesions,
                    **ctx,
                )
        for arm, res in arms.items():
            if arm == STORED:
                continue
            for label, cls in enumerate(CLASSES):
                diff, ci = paired_cpm_difference(
                    arms[STORED].images,
                    res.images,
                    label,
                    n_boot=args.n_boot,
                    seed=fed.seed,
                )
                emit(
                    BENCH,
                    f"{arm}-minus-stored-cpm-{cls}",
                    diff,
                    "cpm",
                    results_dir=args.results,
                    arm=arm,
                    paired_ci95=[rounded(x) for x in ci],
                    **ctx,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
