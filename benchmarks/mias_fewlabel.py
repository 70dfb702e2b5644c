"""mini-MIAS as a new vendor with few labels: pretrained vs from scratch (issue #6).

Patient-level k-fold cross-validation of one TrainConfig
(``configs/real/mini-mias-fewlabel.yaml``: each fold trains on only
``labeled_patients`` women of its other folds and predicts its whole held-out
fold) in several ARMS that differ only in the detector's initialisation:

* ``scratch``: random initialisation (the baseline, measured in the same run);
* ``NAME=PATH``: starts from the pretrained model file PATH (e.g. the phantom
  federation's global model, ``mammofed-client export --global-only``).

Every arm predicts the same images, so besides each arm's pooled out-of-fold
CPM with its bootstrap interval, the difference to ``scratch`` gets a PAIRED
bootstrap interval (:func:`common.detector.froc.paired_cpm_difference`). Folds already
trained in an arm's folder are only re-predicted, so a rerun is cheap.

Usage::

    python -m benchmarks.mias_fewlabel --config configs/real/mini-mias-fewlabel.yaml \\
        --arm fedavg=out/cpu-study/fedavg-global.pt [--arm base=out/adapt/base.pt]

One JSON line per figure in ``benchmarks/results/mias_fewlabel.jsonl``, FROC
overlays ``mias_fewlabel_froc-<class>.png`` beside it. Arm ``NAME`` writes into
``<config out_dir>/../cv-fewlabel-NAME`` (``scratch`` into ``out_dir`` itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, emit, rounded
from common.detector.froc import FrocResult, froc_all, paired_cpm_difference, plot_froc
from common.keys import CLASSES
from simulation.crossval import load_oof_images, run_crossval
from simulation.train import TrainConfig, load_train_config

BENCH = "mias_fewlabel"
SCRATCH = "scratch"

log = logging.getLogger("benchmarks.mias_fewlabel")


def parse_arm(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` -> ``(NAME, PATH)``; the file must exist."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--arm: expected NAME=PATH, got {text!r}")
    if name == SCRATCH:
        raise argparse.ArgumentTypeError(f"--arm: {SCRATCH!r} is the built-in arm")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"--arm {name}: no such file {path}")
    return name, Path(path)


def arm_config(cfg: TrainConfig, name: str, init: Path | None) -> TrainConfig:
    """``cfg`` for arm ``name``: its own folder and initialisation."""
    if name == SCRATCH:
        return dataclasses.replace(cfg, init_checkpoint=None)
    out = Path(cfg.out_dir).parent / f"cv-fewlabel-{name}"
    return dataclasses.replace(cfg, out_dir=out, init_checkpoint=init)


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) every arm's CV and emit the comparison."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--config", type=Path, default=Path("configs/real/mini-mias-fewlabel.yaml")
    )
    p.add_argument("--arm", type=parse_arm, action="append", default=[])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--results", type=Path, default=None, help="PNG folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_train_config(args.config)
    arms: list[tuple[str, Path | None]] = [(SCRATCH, None), *args.arm]
    images: dict[str, Any] = {}
    results: dict[str, dict[str, FrocResult]] = {}
    for name, init in arms:
        acfg = arm_config(cfg, name, init)
        doc = run_crossval(acfg, k=args.folds)
        images[name] = load_oof_images(acfg)
        results[name] = froc_all(images[name], n_boot=args.n_boot, seed=cfg.seed)
        ctx = {
            "arm": name,
            "init_checkpoint": None if init is None else str(init),
            "labeled_patients": cfg.labeled_patients,
            "k": args.folds,
            "n_images": len(images[name]),
            "train_images_per_fold": [f["n_train_images"] for f in doc["folds"]],
            "steps_per_fold": [
                cfg.epochs
                * math.ceil(
                    (cfg.samples_per_epoch or f["n_train_images"]) / cfg.batch_size
                )
                for f in doc["folds"]
            ],
            "seconds_per_fold": [f["seconds"] for f in doc["folds"]],
            "arch": cfg.model.arch,
            "config": str(args.config),
        }
        for cls, r in results[name].items():
            emit(
                BENCH,
                f"{name}-cpm-{cls}",
                r.cpm,
                "cpm",
                ci95=None if r.cpm_ci is None else [rounded(x) for x in r.cpm_ci],
                sens_at_1fp=rounded(r.sens_at[1.0]),
                sens_at_4fp=rounded(r.sens_at[4.0]),
                n_lesions=r.n_lesions,
                fold_cpm=[f["cpm"][cls] for f in doc["folds"]],
                **ctx,
            )
    for name, _ in arms[1:]:
        for label, cls in enumerate(CLASSES):
            diff, ci = paired_cpm_difference(
                images[SCRATCH],
                images[name],
                label,
                n_boot=args.n_boot,
                seed=cfg.seed,
            )
            emit(
                BENCH,
                f"{name}-minus-scratch-cpm-{cls}",
                diff,
                "cpm",
                paired_ci95=[rounded(x) for x in ci],
                arm=name,
                n_lesions=results[name][cls].n_lesions,
                labeled_patients=cfg.labeled_patients,
                config=str(args.config),
            )
    out_dir = args.results or RESULTS_DIR
    for cls in CLASSES:
        curves = [
            dataclasses.replace(results[name][cls], name=f"{name}: {cls}")
            for name, _ in arms
        ]
        plot_froc(
            curves,
            Path(out_dir) / f"{BENCH}_froc-{cls}.png",
            title=f"mini-MIAS, {cfg.labeled_patients} labeled women: {cls}",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
