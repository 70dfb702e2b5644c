"""Vendor shift: a detector trained on the base vendor (H) alone, on every vendor.

Trains the ``base`` regime's model (site A, vendor H; same recipe as
``mammofed-sim run``) and evaluates it:

* on its home site's held-out test women (the in-vendor reference), and
* on **every** image of each other site, with the oracle's complete labels
  (none of those images was seen in training, so all of them are fair test
  images; this gives 3-10x more lesions than the sites' test splits).

Emits, per site and class, ``base_cpm`` (with a 95% bootstrap interval) and
``drop_vs_home = CPM(home test) - CPM(site)``.

Usage: ``python -m benchmarks.shift [--scenario F] [--federation F] [--epochs N]
[--data DIR]`` (defaults: the demo scenario and ``sim-demo.yaml``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmarks.common import emit
from client.detector_trainer import DetectorOptions
from client.local_training import train_central
from common.config.loader import from_mapping
from common.detector.engine import evaluate_detailed, resolve_device
from common.imaging.data import SiteDataset
from common.wire.federation import load_federation_config
from common.wire.runfolder import SiteMetrics
from simulation.run import prepare_sites

REPO = Path(__file__).resolve().parents[1]
BENCH = "shift"


def main() -> None:
    """Train on the base site, evaluate everywhere, emit one JSON line per figure."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default=str(REPO / "configs/simulation/demo.yaml"))
    ap.add_argument(
        "--federation", default=str(REPO / "configs/federation/sim-demo.yaml")
    )
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--data", default=str(REPO / "out/shift-data"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    scenario, caches, oracle = prepare_sites(Path(args.scenario), Path(args.data), 2)
    fed = load_federation_config(args.federation)
    opts = from_mapping(
        dict(fed.trainer.options), DetectorOptions, prefix="trainer.options"
    )
    home = next((s.name for s in scenario.sites if s.role == "base"), None)
    home = home or scenario.sites[0].name
    device = resolve_device(opts.device)
    model = train_central(
        [caches[home]],
        opts,
        epochs=args.epochs,
        lr=fed.trainer.learning_rate,
        batch_size=fed.trainer.batch_size,
        seed=fed.seed,
        device=device,
        label=f"base/{home}",
    )
    ctx = {
        "scenario": Path(args.scenario).name,
        "federation": Path(args.federation).name,
        "arch": opts.arch,
        "epochs": args.epochs,
        "home": home,
    }
    results = {}
    for s in scenario.sites:
        if s.name == home:
            view = SiteDataset(caches[home], seed=fed.seed).view("test")
            split = "test"
        else:
            view = SiteDataset(oracle[s.name], seed=fed.seed).view("all")
            split = "all-images-oracle-labels"
        ev = evaluate_detailed(model, view, device, n_boot=500)
        res = SiteMetrics.from_results(ev.per_class)
        results[s.name] = (res, split, s.vendor)
    for site, (res, split, vendor) in results.items():
        for cls, c in res.classes.items():
            if c.cpm is None:
                continue
            extra = {"site": site, "vendor": vendor, "cls": cls, "split": split}
            extra["n_lesions"] = c.n_lesions
            ci = None if c.cpm_ci95 is None else list(c.cpm_ci95)
            emit(BENCH, "base_cpm", c.cpm, "cpm", ci95=ci, **extra, **ctx)
            home_cpm = results[home][0].classes[cls].cpm
            if site != home and home_cpm is not None:
                emit(BENCH, "drop_vs_home", home_cpm - c.cpm, "cpm", **extra, **ctx)


if __name__ == "__main__":
    main()
