"""benchmarks.mias_train_time: baseline and final recipe timed, one line each."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import mias_train_time as bench
from tests.conftest import make_site_cache


def test_times_baseline_and_final_recipe_and_flags_a_shortened_run(
    tmp_path: Path,
) -> None:
    cache = make_site_cache(tmp_path / "cache" / "S", n_patients=3)
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(
        f"caches: [{cache}]\nout_dir: {tmp_path / 'unused'}\n"
        "model: {arch: tiny, fpn_channels: 16, working_spacing_mm: 0.4, "
        "speck_channel: true}\n"
        "augment: {paste: true, min_box_mm: 12.0}\n"
        "epochs: 3\nbatch_size: 2\nwarmup_steps: 1\ndevice: cpu\nn_boot: 0\n"
        "test_fraction: 0.0\n"
    )
    results = tmp_path / "results"
    rc = bench.main(
        ["--config", str(cfg), "--out", str(tmp_path / "out"), "--epochs", "1"]
        + ["--baseline-epochs", "1", "--threads", "1", "--results", str(results)]
    )
    assert rc == 0
    rows = [
        json.loads(x)
        for x in (results / "mias_train_time.jsonl").read_text().splitlines()
    ]
    figures = {r["figure"]: r for r in rows}
    assert set(figures) == {
        "plain_recipe_min_per_epoch",
        "final_recipe_min_per_epoch",
        "final_recipe_train_min",
    }
    total = figures["final_recipe_train_min"]
    assert total["value"] > 0 and total["unit"] == "min"
    # one epoch of a three-epoch recipe is not the figure the limit is about
    assert total["context"]["shortened"] is True
    assert total["context"]["within_limit"] is False
    assert total["context"]["config_epochs"] == 3
    # both runs trained for real: each wrote its final checkpoint
    assert (tmp_path / "out" / "final" / "final.pt").is_file()
    assert (tmp_path / "out" / "plain" / "final.pt").is_file()
