"""``benchmarks.adapt`` runs end to end on a tiny scenario (not a quality test).

The quality figures come from ``python -m benchmarks.adapt`` on
``configs/simulation/adapt-cpu.yaml``; here only the harness is checked: it
builds the sites, trains and reuses the base model, and writes one JSON line
per semi-supervised arm, every CPM in [0, 1] with its per-class intervals.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from benchmarks import adapt
from client.detector_trainer import DetectorOptions
from common.config import from_mapping

REPO = Path(__file__).resolve().parents[2]


def _tiny_scenario(tmp_path: Path) -> Path:
    text = (REPO / "configs" / "simulation" / "adapt-cpu.yaml").read_text()
    text = (
        text.replace("women: 40", "women: 3")
        .replace("women: 24", "women: 3")
        .replace("women: 100", "women: 5")
        .replace("labeled_fraction: 0.15", "labeled_fraction: 0.4")
        .replace(
            "vendors_dir: vendors",
            f"vendors_dir: {REPO / 'configs' / 'simulation' / 'vendors'}",
        )
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


@pytest.mark.timeout(300)
def test_adapt_benchmark_ssl_arms(tmp_path, monkeypatch):
    from benchmarks.common import RESULTS_ENV

    results = tmp_path / "results"
    monkeypatch.setenv(RESULTS_ENV, str(results))
    (tmp_path / "a.yaml").write_text("rampup_steps: 1\n")
    argv = [
        "--scenario",
        str(_tiny_scenario(tmp_path)),
        "--data",
        str(tmp_path / "data"),
        "--arch",
        "tiny",
        "--base-epochs",
        "1",
        "--steps",
        "2",
        "--adapt-config",
        str(tmp_path / "a.yaml"),
        "--only",
        "ssl",
        "--device",
        "cpu",
    ]
    adapt.main(argv)
    assert (tmp_path / "data" / adapt.BASE_CKPT).is_file()
    lines = [json.loads(x) for x in (results / "adapt.jsonl").read_text().splitlines()]
    arms = {x["figure"]: x for x in lines}
    for arm in ("base", "sup", "ssl-pseudo", "ssl-dense", "all-labels"):
        rec = arms[f"ssl-{arm}-cpm-mean"]
        assert 0.0 <= rec["value"] <= 1.0
        assert set(rec["context"]["per_class"]) == {"mass", "calcification"}
    assert arms["ssl-sup-cpm-mean"]["context"]["steps_done"] == 2
    for arm in ("ssl-pseudo", "ssl-dense", "all-labels"):
        for cls in ("mass", "calcification"):
            rec = arms[f"ssl-{arm}-minus-sup-cpm-{cls}"]
            assert len(rec["context"]["paired_ci95"]) == 2
    # the labeled subset is smaller than every training image of the oracle
    assert arms["ssl-sup-cpm-mean"]["context"]["labeled"] > 0
    assert arms["ssl-sup-cpm-mean"]["context"]["unlabeled"] > 0
    # the base model is reused, not trained again
    stamp = (tmp_path / "data" / adapt.BASE_CKPT).stat().st_mtime_ns
    args = argparse.Namespace(data=tmp_path / "data")
    opts = from_mapping({"arch": "tiny"}, DetectorOptions, source="test")
    model = adapt._base(args, {}, ["A"], opts, torch.device("cpu"))
    assert isinstance(model, torch.nn.Module)
    assert (tmp_path / "data" / adapt.BASE_CKPT).stat().st_mtime_ns == stamp
    # --labeled-patients: one woman keeps her labels, the others' images join
    # the unlabeled pool (nothing lost, nothing labeled twice)
    results.joinpath("adapt.jsonl").unlink()
    adapt.main([*argv, "--labeled-patients", "1", "--arms", "sup,all-labels"])
    lines = [json.loads(x) for x in (results / "adapt.jsonl").read_text().splitlines()]
    few = {x["figure"]: x for x in lines}["ssl-sup-cpm-mean"]["context"]
    ctx = arms["ssl-sup-cpm-mean"]["context"]
    assert few["labeled_patients"] == 1 and 0 < few["labeled"] <= ctx["labeled"]
    assert few["labeled"] + few["unlabeled"] == ctx["labeled"] + ctx["unlabeled"]
