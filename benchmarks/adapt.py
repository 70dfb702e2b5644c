"""Quality comparison of client-side adaptation (measured, not asserted).

Semi-supervised site (``--ssl-cache``, e.g. scenario site C with 10-20% labels):

* ``sup``: supervised on the labeled view only;
* ``ssl-pseudo`` / ``ssl-dense``: the same plus mean-teacher consistency on
  the unlabeled view (``common.adapt.local_round``), evaluated on the teacher;
* ``all-labels``: supervised on the labeled view of ``--ssl-full-cache`` (the
  same site ingested with every label), when given.
* figure ``gap-closed`` = (ssl - sup) / (all - sup) on ``cpm-mean``.

Few-shot site (``--fewshot-cache``, e.g. site B) from ``--base-checkpoint``:
``local-only`` (from scratch), ``full-ft``, ``head-only`` and
``head-only+std`` (histogram standardization fitted on the site's images).

Every arm is evaluated on the site's own test view with ``common.engine``'s
FROC; one JSON line per figure goes to ``benchmarks/results/adapt.jsonl``.

Example::

    python -m benchmarks.adapt --ssl-cache runs/cache/C --ssl-full-cache \
        runs/cache/C-full --fewshot-cache runs/cache/B \
        --base-checkpoint runs/base/last.pt --epochs 20 --device auto
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from benchmarks.common import emit
from common.adapt import (
    AdaptConfig,
    HistogramStandardizer,
    MeanTeacher,
    UnlabeledImages,
    fewshot_frozen_keys,
    finetune_head,
    local_round,
)
from common.adapt.augment import StrongAugment
from common.checkpoint import load_model
from common.config import from_mapping, load_config
from common.data import SiteDataset, collate
from common.engine import evaluate, resolve_device, seed_everything
from common.keys import CPM_MEAN
from common.model import ModelConfig, Personalization, build_detector

log = logging.getLogger("benchmarks.adapt")
BENCH = "adapt"


def _loader(ds: Any, batch: int, shuffle: bool) -> DataLoader[Any]:
    return DataLoader(ds, batch_size=batch, shuffle=shuffle, collate_fn=collate)


def _eval(model: torch.nn.Module, site: SiteDataset, dev: torch.device, **kw: Any):
    return evaluate(model, site.view("test", **kw), dev, n_boot=200)


def _train_ssl(
    site: SiteDataset,
    model_cfg: ModelConfig,
    cfg: AdaptConfig,
    epochs: int,
    dev: torch.device,
    batch: int,
) -> dict[str, float]:
    seed_everything(cfg.seed)
    model = build_detector(model_cfg).to(dev)
    teacher = MeanTeacher(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    lab = _loader(site.view("labeled", transform=StrongAugment(seed=1)), batch, True)
    unl = _loader(UnlabeledImages(site.view("unlabeled")), batch, True)
    step = 0
    for ep in range(epochs):
        stats = local_round(model, teacher, lab, unl, opt, cfg, dev, step)
        step = stats.step
        log.info("ssl=%s epoch %d: %s", cfg.ssl_enabled, ep, stats)
    target = teacher.module if cfg.ssl_enabled else model
    return _eval(target, site, dev)


def run_ssl(args: argparse.Namespace, base: AdaptConfig, dev: torch.device) -> None:
    """Semi-supervised comparison on one site."""
    model_cfg = ModelConfig(arch=args.arch)
    site = SiteDataset(args.ssl_cache, seed=args.split_seed)
    ctx: dict[str, Any] = {
        "site": str(args.ssl_cache),
        "epochs": args.epochs,
        "arch": args.arch,
    }
    ctx["labeled"] = len(site.view("labeled"))
    ctx["unlabeled"] = len(site.view("unlabeled"))
    res: dict[str, float] = {}
    arms = {
        "sup": from_mapping({"ssl_enabled": False}, AdaptConfig),
        "ssl-pseudo": base,
        "ssl-dense": dataclasses.replace(base, consistency="dense"),
    }
    for name, cfg in arms.items():
        m = _train_ssl(site, model_cfg, cfg, args.epochs, dev, args.batch)
        res[name] = m[CPM_MEAN]
        emit(BENCH, f"ssl-{name}-cpm-mean", m[CPM_MEAN], "cpm", arm=name, **ctx)
    if args.ssl_full_cache is not None:
        full = SiteDataset(args.ssl_full_cache, seed=args.split_seed)
        m = _train_ssl(full, model_cfg, arms["sup"], args.epochs, dev, args.batch)
        res["all"] = m[CPM_MEAN]
        emit(BENCH, "ssl-all-labels-cpm-mean", m[CPM_MEAN], "cpm", **ctx)
        gap = res["all"] - res["sup"]
        for name in ("ssl-pseudo", "ssl-dense"):
            closed = (res[name] - res["sup"]) / gap if gap > 0 else float("nan")
            emit(BENCH, f"gap-closed-{name}", closed, "fraction", **ctx)


def run_fewshot(args: argparse.Namespace, base: AdaptConfig, dev: torch.device) -> None:
    """Few-shot comparison on one site, from a base checkpoint."""
    if args.base_checkpoint is None:
        raise SystemExit("--fewshot-cache needs --base-checkpoint")
    site = SiteDataset(args.fewshot_cache, seed=args.split_seed)
    start, _ = load_model(args.base_checkpoint)
    pers = Personalization(local_norm=args.local_norm)
    frozen = fewshot_frozen_keys(start, pers)
    ctx: dict[str, Any] = {
        "site": str(args.fewshot_cache),
        "labeled": len(site.view("labeled")),
    }
    # local-only: from scratch, full training, same CV-chosen epochs machinery
    seed_everything(base.seed)
    scratch = build_detector(start.cfg).to(dev)  # type: ignore[arg-type]
    finetune_head(
        scratch, site.view("labeled"), frozen, base, device=dev, head_only=False
    )
    emit(
        BENCH,
        "fewshot-local-only-cpm-mean",
        _eval(scratch, site, dev)[CPM_MEAN],
        "cpm",
        **ctx,
    )
    for name, head_only in (("full-ft", False), ("head-only", True)):
        seed_everything(base.seed)
        model = copy.deepcopy(start).to(dev)
        st = finetune_head(
            model, site.view("labeled"), frozen, base, device=dev, head_only=head_only
        )
        emit(
            BENCH,
            f"fewshot-{name}-cpm-mean",
            _eval(model, site, dev)[CPM_MEAN],
            "cpm",
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
    m = _eval(model, site, dev, transform=std)
    emit(
        BENCH,
        "fewshot-head-only+std-cpm-mean",
        m[CPM_MEAN],
        "cpm",
        epochs=st.epochs,
        **ctx,
    )


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the requested comparisons."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ssl-cache", type=Path)
    p.add_argument("--ssl-full-cache", type=Path)
    p.add_argument("--fewshot-cache", type=Path)
    p.add_argument("--base-checkpoint", type=Path)
    p.add_argument("--adapt-config", type=Path, help="AdaptConfig YAML")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--local-norm", action="store_true")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = (
        load_config(args.adapt_config, AdaptConfig)
        if args.adapt_config
        else AdaptConfig()
    )
    dev = resolve_device(args.device)
    if args.ssl_cache is not None:
        run_ssl(args, cfg, dev)
    if args.fewshot_cache is not None:
        run_fewshot(args, cfg, dev)


if __name__ == "__main__":
    main()
