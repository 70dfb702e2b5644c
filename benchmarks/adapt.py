"""Quality comparison of client-side adaptation (measured, not asserted).

One command runs the whole comparison on a phantom scenario::

    python -m benchmarks.adapt --scenario configs/simulation/adapt-cpu.yaml \
        --data out/adapt --steps 600 --device auto

1. The scenario's sites are generated and ingested (reused when unchanged),
   each also with the oracle's complete labels (``simulation.run.prepare_sites``).
2. The **base** detector is trained centrally on the ``role: base`` sites (the
   home vendor H) with the study's recipe (``client.local_training.train_central``);
   ``<data>/base.pt`` is reused when present. Every arm below starts from it,
   as a site joining the federation starts from the global model.
3. Semi-supervised site (``role: semi-supervised``), same optimizer-step budget
   (``--steps``) for every arm, each evaluated on its EMA (teacher) weights:

   * ``sup``: the labeled images only (10-20% of the site's training images;
     ``--labeled-patients N`` keeps the labels of only N women, the other
     labeled images join the unlabeled pool);
   * ``ssl-pseudo``: plus Unbiased-Teacher pseudo boxes on the unlabeled images;
   * ``ssl-dense``: plus Dense-Teacher soft targets on the unlabeled images;
   * ``all-labels``: supervised on every training image with its oracle label
     (an upper bound only a phantom can give);
   * figure ``gap-closed-<arm>`` = (arm - sup) / (all - sup) on ``cpm-mean``;
   * figures ``ssl-<arm>-minus-sup-cpm-<class>``: the CPM difference to
     ``sup`` on the same test images with a paired bootstrap interval.

4. Few-shot site (``role: few-shot``): ``local-only`` (from scratch, all
   layers), ``full-ft`` and ``head-only`` from the base, and ``head-only+std``
   (site-fitted histogram standardization). Epochs are chosen by the site's own
   patient-grouped cross-validation (``common.detector.adapt.finetune_head``).

Every arm is scored on the site's held-out test women with ``common.detector.engine``'s
FROC (CPM per class with a bootstrap interval over images); one JSON line per
figure goes to ``benchmarks/results/adapt.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import emit
from client.detector_trainer import DetectorOptions
from common.config import from_mapping, load_config
from common.detector.adapt import (
    AdaptConfig,
    HistogramStandardizer,
    MeanTeacher,
    UnlabeledImages,
    fewshot_frozen_keys,
    finetune_head,
    local_round,
)
from common.detector.adapt.augment import StrongAugment
from common.detector.checkpoint import load_model, save_checkpoint
from common.detector.engine import (
    evaluate,
    evaluate_detailed,
    resolve_device,
    seed_everything,
)
from common.detector.froc import paired_cpm_difference
from common.detector.model import Personalization
from common.detector.recipe import Recipe
from common.imaging.data import SiteDataset, collate
from common.keys import CLASSES, CPM_MEAN
from simulation.train import few_label_subset

log = logging.getLogger("benchmarks.adapt")
BENCH = "adapt"
BASE_CKPT = "base.pt"


def _eval(model: nn.Module, site: SiteDataset, dev: torch.device, **kw: Any):
    return evaluate(model, site.view("test", **kw), dev, n_boot=500)


def _emit_arm(figure: str, m: dict[str, Any], **ctx: Any) -> float:
    """One line for the mean CPM, with the per-class CPMs and intervals."""
    per_class = {
        c: {
            "cpm": m.get(f"cpm-{c}"),
            "ci95": [m.get(f"cpm-{c}-ci-lo"), m.get(f"cpm-{c}-ci-hi")],
        }
        for c in CLASSES
    }
    emit(BENCH, figure, m[CPM_MEAN], "cpm", per_class=per_class, **ctx)
    return float(m[CPM_MEAN])


def _train_ssl(
    start: nn.Module,
    site: SiteDataset,
    cfg: AdaptConfig,
    steps: int,
    dev: torch.device,
    batch: int,
    lr: float,
    lesion_prob: float,
    split: tuple[list[int], list[int]] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``steps`` optimizer steps of ``local_round`` from ``start``; the teacher.

    ``split``: ``(labeled, unlabeled)`` record indices of ``site`` (default its
    ``labeled`` and ``unlabeled`` views); the unlabeled ones never show a label.
    """
    seed_everything(cfg.seed)
    model = copy.deepcopy(start).to(dev)
    teacher = MeanTeacher(model, cfg.ema_decay)
    recipe = Recipe(lr=lr, batch_size=batch, lesion_prob=lesion_prob)
    opt = recipe.optimizer(model.parameters())
    lab_idx, unl_idx = split or (site.indices("labeled"), site.indices("unlabeled"))
    view = site.subset(lab_idx, StrongAugment(seed=cfg.seed + 1))
    unl_view = site.subset(unl_idx, hide_labels=True)
    unl = None
    if cfg.ssl_enabled and len(unl_view) > 0:
        unl = DataLoader(
            UnlabeledImages(unl_view),
            batch_size=batch,
            shuffle=True,
            collate_fn=collate,
        )
    step, rnd, t0 = 0, 0, time.perf_counter()
    totals = {"pseudo": 0.0, "unlabeled_seen": 0, "skipped": 0}
    while step < steps:
        lab = recipe.loader(view, batch * min(50, steps - step), seed=rnd)
        st = local_round(model, teacher, lab, unl, opt, cfg, dev, step)
        if st.step == step:
            raise RuntimeError("local_round made no step")
        step, rnd = st.step, rnd + 1
        totals["pseudo"] += st.pseudo_per_image * st.unlabeled_images
        totals["unlabeled_seen"] += st.unlabeled_images
        totals["skipped"] += st.skipped_steps
        log.info("ssl=%s %s: step %d/%d", cfg.ssl_enabled, cfg.consistency, step, steps)
    info = {
        **totals,
        "pseudo": round(totals["pseudo"]),
        "steps_done": step,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return teacher.module, info


def _base(
    args: argparse.Namespace,
    caches: dict[str, Path],
    base_sites: list[str],
    opts: DetectorOptions,
    dev: torch.device,
) -> nn.Module:
    from client.local_training import train_central

    path = args.data / BASE_CKPT
    if path.is_file():
        log.info("base model reused from %s", path)
        model, _ = load_model(path, opts.model_config())
        return model
    model = train_central(
        [caches[s] for s in base_sites],
        opts,
        epochs=args.base_epochs,
        lr=args.lr,
        batch_size=args.batch,
        seed=args.seed,
        device=dev,
        label="base",
    )
    save_checkpoint(path, model, opts.model_config(), extra={"sites": base_sites})
    return model


def run_ssl(
    args: argparse.Namespace,
    start: nn.Module,
    cache: Path,
    oracle: Path,
    cfg: AdaptConfig,
    dev: torch.device,
) -> None:
    """Semi-supervised comparison on one site (same step budget per arm)."""
    site = SiteDataset(cache, seed=args.seed)
    full = SiteDataset(oracle, seed=args.seed)
    lab, unl = site.indices("labeled"), site.indices("unlabeled")
    if args.labeled_patients is not None:
        # fewer labels than the site has: the other labeled women's images
        # join the unlabeled pool, their labels unseen
        keep = few_label_subset(site, lab, args.labeled_patients, args.seed)
        unl = sorted(unl + sorted(set(lab) - set(keep)))
        lab = keep
    ctx: dict[str, Any] = {
        "site": cache.name,
        "scenario": args.scenario.name,
        "steps": args.steps,
        "arch": args.arch,
        "labeled": len(lab),
        "labeled_patients": len({site.records[i].patient_id for i in lab}),
        "unlabeled": len(unl),
        "test_images": len(site.view("test")),
        "score_thresholds": dict(cfg.score_thresholds),
        "rampup_steps": cfg.rampup_steps,
    }
    _emit_arm("ssl-base-cpm-mean", _eval(start, site, dev), **ctx)
    sup_cfg = dataclasses.replace(cfg, ssl_enabled=False)
    split = (lab, unl)
    every = (full.indices("labeled"), full.indices("unlabeled"))
    arms: dict[str, tuple[SiteDataset, AdaptConfig, Any]] = {
        "sup": (site, sup_cfg, split),
        "ssl-pseudo": (
            site,
            dataclasses.replace(cfg, consistency="pseudo_boxes"),
            split,
        ),
        "ssl-dense": (site, dataclasses.replace(cfg, consistency="dense"), split),
        "all-labels": (full, sup_cfg, every),
    }
    if args.arms:
        arms = {k: v for k, v in arms.items() if k in args.arms}
    res: dict[str, float] = {}
    images: dict[str, Any] = {}
    test = site.view("test")
    for name, (ds, acfg, idx) in arms.items():
        model, info = _train_ssl(
            start, ds, acfg, args.steps, dev, args.batch, args.lr, args.lesion_prob,
            idx,
        )  # fmt: skip
        r = evaluate_detailed(model, test, dev, n_boot=500)
        images[name] = r.images
        res[name] = _emit_arm(
            f"ssl-{name}-cpm-mean", r.metrics, arm=name, **info, **ctx
        )
    # paired on the same test images: each arm against the supervised one
    for name in [n for n in images if n != "sup" and "sup" in images]:
        for label, cls in enumerate(CLASSES):
            diff, ci = paired_cpm_difference(
                images["sup"], images[name], label, n_boot=500, seed=cfg.seed
            )
            emit(
                BENCH, f"ssl-{name}-minus-sup-cpm-{cls}", diff, "cpm",
                paired_ci95=list(ci), **ctx,
            )  # fmt: skip
    if "all-labels" not in res or "sup" not in res:
        return
    gap = res["all-labels"] - res["sup"]
    if gap <= 0:
        log.warning(
            "all labels (%.3f) do not beat the labeled subset (%.3f): no gap to close",
            res["all-labels"],
            res["sup"],
        )
        return
    for name in ("ssl-pseudo", "ssl-dense"):
        if name not in res:  # arm not run (--arms)
            continue
        closed = (res[name] - res["sup"]) / gap
        emit(BENCH, f"gap-closed-{name}", closed, "fraction", gap=gap, **ctx)


def run_fewshot(
    args: argparse.Namespace,
    start: nn.Module,
    cache: Path,
    base: AdaptConfig,
    opts: DetectorOptions,
    dev: torch.device,
) -> None:
    """Few-shot comparison on one site, from the base model."""
    site = SiteDataset(cache, seed=args.seed)
    frozen = fewshot_frozen_keys(start, Personalization(local_norm=args.local_norm))
    labeled = site.view("labeled")
    ctx: dict[str, Any] = {
        "site": cache.name,
        "scenario": args.scenario.name,
        "arch": args.arch,
        "labeled": len(labeled),
        "test_images": len(site.view("test")),
    }
    _emit_arm("fewshot-base-cpm-mean", _eval(start, site, dev), **ctx)
    seed_everything(base.seed)
    from common.detector.model import build_detector

    scratch = build_detector(opts.model_config()).to(dev)
    st = finetune_head(scratch, labeled, frozen, base, device=dev, head_only=False)
    _emit_arm(
        "fewshot-local-only-cpm-mean",
        _eval(scratch, site, dev),
        epochs=st.epochs,
        **ctx,
    )
    for name, head_only in (("full-ft", False), ("head-only", True)):
        seed_everything(base.seed)
        model = copy.deepcopy(start).to(dev)
        st = finetune_head(
            model, labeled, frozen, base, device=dev, head_only=head_only
        )
        _emit_arm(
            f"fewshot-{name}-cpm-mean",
            _eval(model, site, dev),
            epochs=st.epochs,
            **ctx,
        )
    train = site.view("train")
    std = HistogramStandardizer.fit((train[i][0] for i in range(len(train))), base)
    seed_everything(base.seed)
    model = copy.deepcopy(start).to(dev)
    st = finetune_head(
        model,
        site.view("labeled", transform=std),
        frozen,
        base,
        device=dev,
        head_only=True,
    )
    _emit_arm(
        "fewshot-head-only+std-cpm-mean",
        _eval(model, site, dev, transform=std),
        epochs=st.epochs,
        **ctx,
    )


def _site_of(scenario: Any, role: str) -> str | None:
    return next((s.name for s in scenario.sites if s.role == role), None)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the comparisons the scenario's roles allow."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", type=Path, required=True)
    p.add_argument("--data", type=Path, default=Path("out/adapt"))
    p.add_argument("--adapt-config", type=Path, help="AdaptConfig YAML")
    p.add_argument("--arch", default="small")
    p.add_argument("--base-epochs", type=int, default=30)
    p.add_argument("--steps", type=int, default=600, help="SSL steps per arm")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lesion-prob", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--local-norm", action="store_true")
    p.add_argument("--only", choices=["ssl", "fewshot"], default=None)
    p.add_argument(
        "--labeled-patients",
        type=int,
        default=None,
        help="semi-supervised site: keep the labels of only N of its labeled "
        "women (the rest join the unlabeled pool), e.g. 10%% of its women",
    )
    p.add_argument(
        "--arms",
        type=lambda s: [x for x in s.split(",") if x],
        default=None,
        help="semi-supervised arms to run (sup,ssl-pseudo,ssl-dense,all-labels)",
    )
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from simulation.run import prepare_sites

    cfg = (
        load_config(args.adapt_config, AdaptConfig)
        if args.adapt_config
        else AdaptConfig()
    )
    cfg = dataclasses.replace(cfg, seed=args.seed)
    dev = resolve_device(args.device)
    scenario, caches, oracle = prepare_sites(args.scenario, args.data, args.workers)
    opts = from_mapping(
        {
            "arch": args.arch,
            "working_spacing_mm": scenario.working_spacing_mm,
            "lesion_prob": args.lesion_prob,
        },
        DetectorOptions,
        source="benchmarks.adapt",
    )
    base_sites = [s.name for s in scenario.sites if s.role == "base"]
    start = _base(args, caches, base_sites, opts, dev).to(dev)
    ssl_site = _site_of(scenario, "semi-supervised")
    if ssl_site is not None and args.only in (None, "ssl"):
        run_ssl(args, start, caches[ssl_site], oracle[ssl_site], cfg, dev)
    few_site = _site_of(scenario, "few-shot")
    if few_site is not None and args.only in (None, "fewshot"):
        run_fewshot(args, start, caches[few_site], cfg, opts, dev)


if __name__ == "__main__":
    main()
