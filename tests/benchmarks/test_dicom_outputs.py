"""benchmarks.dicom_outputs: one line per figure, from a real exam's outputs."""

from __future__ import annotations

import json

from benchmarks.dicom_outputs import main


def test_emits_the_figures_with_their_baseline(tmp_path):
    argv = ["--rows", "128", "--cols", "96", "--detections", "6", "--repeat", "1"]
    assert main([*argv, "--results", str(tmp_path)]) == 0
    lines = [json.loads(x) for x in (tmp_path / "dicom_outputs.jsonl").open()]
    got = {x["figure"]: x for x in lines}
    assert list(got) == [
        "read-headers-seconds",
        "cad-sr-seconds",
        "gsps-seconds",
        "cad-sr-bytes",
        "gsps-bytes",
    ]
    assert got["cad-sr-seconds"]["context"]["ratio_to_read_headers"] > 0
    assert got["gsps-bytes"]["value"] > 0 and got["cad-sr-bytes"]["value"] > 0
    assert got["gsps-seconds"]["context"]["detections_per_image"] == 6
