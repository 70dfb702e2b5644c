"""Does a hospital get what the study measured? A three-model recipe, by hand.

The study scores ``<regime>+tuned+local`` (``--regime personalized-dp``, the
DP recipe, measured at stop 34; ``--regime personalized-ssl``, the
recommended one since stop 35, runs the same commands) from models it trains
itself. A hospital gets its three models another way: ``mammofed-client
train-local`` trains its own model from the base, ``mammofed-client export``
turns the federation's last round and its own personal layers into a model,
``train-local --init <that model> --lr-factor 0.3`` fine-tunes it on the
site's labels, and ``mammofed-client evaluate`` with several ``--checkpoint``
flags scores them together on its held-out women. This benchmark runs those
commands for one site of one seed of a study, and compares each CPM with the
study's (``seed-<s>/<regime>/metrics.json``): the difference should be zero.
The fine-tuned arms are run where the study ran ``<regime>-tuned``.

Usage::

    python -m benchmarks.hospital_path --study out/study --data out/study-data \\
        --site C --seed 0

One JSON line per arm (local, federated, pair), class and figure in
``benchmarks/results/hospital_path.jsonl``; the step times beside them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit, rounded
from client.cli import main as client_main
from common.keys import CLASSES
from simulation import regimes as R
from simulation.run import trained_in

BENCH = "hospital_path"


def _run(argv: list[str]) -> float:
    """Run one ``mammofed-client`` command; its seconds. Raises on failure."""
    t0 = time.perf_counter()
    rc = client_main(argv)
    if rc != 0:
        raise RuntimeError(f"mammofed-client {' '.join(argv)}: exit status {rc}")
    return time.perf_counter() - t0


def _cpm(metrics: Path, site: str | None = None) -> dict[str, float | None]:
    """Per-class CPM of an evaluate folder's or a study regime's ``metrics.json``.

    ``None`` for a class without lesions on the site's test women.
    """
    doc = json.loads(metrics.read_text())
    if site is not None:  # a study regime: {"sites": {site: {"classes": ...}}}
        doc = doc["sites"][site]
    return {c: doc["classes"][c]["cpm"] for c in CLASSES}


def hospital_path(
    study: Path, data: Path, site: str, seed: int, regime: str, work: Path
) -> list[dict[str, Any]]:
    """Rows ``{arm, class, cpm_hospital, cpm_study, seconds}`` of one site."""
    run = study / f"seed-{seed}"
    cache = data / "cache" / site
    work.mkdir(parents=True, exist_ok=True)
    site_yaml = work / f"site-{site}.yaml"
    site_yaml.write_text(f"name: {site}\ncache_dir: {cache.resolve()}\n")
    local, fed, tuned = work / "local.pt", work / "federated.pt", work / "tuned.pt"
    # a regime copied from an earlier run (--reuse) has its state there
    src = trained_in(run, regime) / regime
    # mammofed-client train-local with the study's federation config
    train = ["train-local", "--site-config", str(site_yaml), "--federation"]
    train += [str(run / "configs" / "federation.yaml")]
    seconds = {
        "train-local": _run(
            [*train, "--init", str(run / "base" / "model.pt"), "--out", str(local)]
        ),
        "export": _run(
            [
                "export",
                "--checkpoint",
                str(src / "server" / "checkpoints"),
                "--site-name",
                site,
                "--state-dir",
                str(src / "site-state"),
                "--out",
                str(fed),
            ]
        ),  # fmt: skip
    }
    arms = {
        "local-only": [local],
        regime: [fed],
        f"{regime}+local": [fed, local],
    }
    tuned_regime = f"{regime}-tuned"
    if (run / tuned_regime / "metrics.json").is_file():
        factor = str(R.REGIMES[tuned_regime].lr_factor)
        seconds["train-local --init federated"] = _run(
            [*train, "--init", str(fed), "--lr-factor", factor, "--out", str(tuned)]
        )
        arms[tuned_regime] = [tuned]
        arms[f"{regime}+tuned"] = [fed, tuned]
        arms[f"{regime}+tuned+local"] = [fed, tuned, local]
    # arms the study did not run (a pair of this recipe it left out) are skipped
    skipped = [a for a in arms if not (run / a / "metrics.json").is_file()]
    for arm in skipped:
        print(f"hospital_path: {run / arm}: not in the study, arm skipped")
        del arms[arm]
    rows: list[dict[str, Any]] = []
    for arm, models in arms.items():
        out = work / f"eval-{arm}"
        argv = ["evaluate", "--cache", str(cache), "--out", str(out), "--n-boot", "0"]
        argv += ["--split-seed", str(seed)]
        for m in models:
            argv += ["--checkpoint", str(m)]
        seconds[f"evaluate {arm}"] = _run(argv)
        got, want = _cpm(out / "metrics.json"), _cpm(run / arm / "metrics.json", site)
        for cls in CLASSES:
            a, b = got[cls], want[cls]
            rows.append(
                {
                    "arm": arm,
                    "class": cls,
                    "cpm_hospital": None if a is None else rounded(a),
                    "cpm_study": None if b is None else rounded(b),
                    "abs_diff": None if a is None or b is None else rounded(abs(a - b)),
                }
            )
    for step, s in seconds.items():
        rows.append({"step": step, "seconds": round(s, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Emit the hospital path's figures beside the study's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", type=Path, required=True, help="folder of seed-<s>/")
    p.add_argument("--data", type=Path, required=True, help="the study's data folder")
    p.add_argument("--site", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regime", default="personalized-dp")
    p.add_argument("--work", type=Path, default=Path("out/hospital-path"))
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    ctx = {"study": str(args.study), "site": args.site, "seed": args.seed}
    for row in hospital_path(
        args.study, args.data, args.site, args.seed, args.regime, args.work
    ):
        if "step" in row:
            emit(BENCH, f"seconds-{row['step']}", row["seconds"], "s",
                 results_dir=args.results, **ctx)  # fmt: skip
            continue
        if row["cpm_hospital"] is None:  # no lesion of the class: nothing to measure
            continue
        emit(
            BENCH,
            f"cpm-{row['arm']}-{row['class']}",
            row["cpm_hospital"],
            "cpm",
            results_dir=args.results,
            cpm_study=row["cpm_study"],
            abs_diff=row["abs_diff"],
            **ctx,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
