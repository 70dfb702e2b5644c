"""benchmarks.compare_runs on crossval out-of-fold files (no study needed).

The regime-folder mode runs on a real study in tests/simulation/test_study.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import compare_runs
from common.wire import runfolder as RF
from tests.benchmarks.test_ensemble import _images


def _oof(path: Path, found: set[int], seed: int) -> Path:
    path.write_text(
        json.dumps(
            [
                {**im.to_json(), "fold": i % 2}
                for i, im in enumerate(_images(found, seed))
            ]
        )  # fmt: skip
    )
    return path


def test_oof_files_pair_on_the_same_images(tmp_path: Path) -> None:
    weak = _oof(tmp_path / "weak.json", {0, 1}, 0)
    strong = _oof(tmp_path / "strong.json", {0, 1, 2, 3, 4, 5}, 1)
    rows = compare_runs.compare(weak, strong, n_boot=50)
    mass = next(r for r in rows if r["class"] == "mass")
    assert mass["site"] == compare_runs.CV_SITE and mass["n_images"] == 8
    # 2 of 8 masses against 6 of 8, each found with the image's top score
    assert mass["sens_at_1fp_a"] == 0.25 and mass["sens_at_1fp_b"] == 0.75
    assert mass["diff"] == pytest.approx(mass["cpm_b"] - mass["cpm_a"])
    assert mass["diff"] > 0.3 and mass["paired_ci95"][0] > 0
    calc = next(r for r in rows if r["class"] == "calcification")
    assert calc["cpm_a"] is None and math.isnan(calc["diff"])
    # two seeds a side: the means over seeds
    two = compare_runs.compare([weak, strong], [strong, strong], n_boot=50)
    m2 = next(r for r in two if r["class"] == "mass")
    assert m2["n_runs"] == 2 and m2["sens_at_1fp_a"] == 0.5
    assert m2["diff"] == pytest.approx(mass["diff"] / 2)
    compare_runs.main(
        ["--a", str(weak), "--b", str(strong), "--results", str(tmp_path / "r")]
        + ["--n-boot", "20", "--label", "strong-vs-weak"]
    )
    line = json.loads(
        (tmp_path / "r" / "compare_runs.jsonl").read_text().split("\n")[0]
    )
    assert line["figure"] == "b-minus-a-cpm-mass" and line["context"]["a"] == str(weak)


def test_other_images_or_no_common_site_are_refused(tmp_path: Path) -> None:
    a = _oof(tmp_path / "a.json", {0}, 0)
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(json.loads(a.read_text())[:5]))
    with pytest.raises(ValueError, match="image sets differ"):
        compare_runs.compare(a, fewer, n_boot=10)
    regime = tmp_path / "study" / "local-only"
    regime.mkdir(parents=True)
    (regime / RF.DETECTIONS_JSON).write_text(
        json.dumps({"B": json.loads(a.read_text())})
    )
    with pytest.raises(ValueError, match=r"no site scored in every run: .*\['B'\]"):
        compare_runs.compare(a, regime, n_boot=10)
    with pytest.raises(ValueError, match=r"missing\.json: not an oof"):
        compare_runs.compare(a, tmp_path / "missing.json", n_boot=10)
    bad = tmp_path / "bad.json"
    bad.write_text("[{]")
    with pytest.raises(ValueError, match="bad.json"):
        compare_runs.compare(a, bad, n_boot=10)


def test_cases_keeps_only_the_women_it_matches(tmp_path: Path) -> None:
    # weak finds women 0, 1; strong 0-5: on women 4-7 weak finds none and
    # strong two of four
    weak = _oof(tmp_path / "weak.json", {0, 1}, 0)
    strong = _oof(tmp_path / "strong.json", {0, 1, 2, 3, 4, 5}, 1)
    rows = compare_runs.compare(weak, strong, n_boot=50, cases="^w[4-7]$")
    mass = next(r for r in rows if r["class"] == "mass")
    assert mass["n_images"] == 4
    assert mass["sens_at_1fp_a"] == 0.0 and mass["sens_at_1fp_b"] == 0.5
    with pytest.raises(
        ValueError, match=r"weak\.json: --cases '\^nobody\$' matches no"
    ):
        compare_runs.compare(weak, strong, n_boot=10, cases="^nobody$")
    compare_runs.main(
        ["--a", str(weak), "--b", str(strong), "--results", str(tmp_path / "r")]
        + ["--n-boot", "20", "--cases", "^w[4-7]$"]
    )
    text = (tmp_path / "r" / "compare_runs.jsonl").read_text()
    line = json.loads(text.splitlines()[0])
    assert line["context"]["cases"] == "^w[4-7]$" and line["context"]["n_images"] == 4


def test_mid_gives_the_share_of_the_gap_it_closes(tmp_path: Path) -> None:
    # a finds 2 of 8 masses, b 6 of 8, mid 4 of 8 (all at the image's top
    # score): mid is half-way on sensitivity, so it closes about half the gap
    a = _oof(tmp_path / "a.json", {0, 1}, 0)
    mid = _oof(tmp_path / "mid.json", {0, 1, 2, 3}, 2)
    b = _oof(tmp_path / "b.json", {0, 1, 2, 3, 4, 5}, 1)
    rows = compare_runs.gap_closed(a, mid, b, n_boot=50)
    mass = next(r for r in rows if r["class"] == "mass")
    assert mass["cpm_a"] < mass["cpm_mid"] < mass["cpm_b"]
    want = (mass["cpm_mid"] - mass["cpm_a"]) / (mass["cpm_b"] - mass["cpm_a"])
    assert mass["closed"] == pytest.approx(want, abs=1e-3)
    assert 0.3 < mass["closed"] < 0.7
    lo, hi = mass["closed_ci95"]
    assert lo <= mass["closed"] <= hi
    calc = next(r for r in rows if r["class"] == "calcification")
    assert math.isnan(calc["closed"])  # no gap: no ratio
    with pytest.raises(ValueError, match=r"--a has 1 runs, --mid has 2 runs"):
        compare_runs.gap_closed(a, [mid, mid], b, n_boot=10)
    compare_runs.main(
        ["--a", str(a), "--mid", str(mid), "--b", str(b)]
        + ["--results", str(tmp_path / "r"), "--n-boot", "20", "--cases", "^w"]
    )
    lines = [
        json.loads(x)
        for x in (tmp_path / "r" / "compare_runs.jsonl").read_text().splitlines()
    ]
    gap = next(x for x in lines if x["figure"] == "mid-closes-gap-mass")
    assert gap["context"]["mid"] == [str(mid)] and gap["unit"] == "fraction"


def _regime(root: Path, regime: str, images, prefix: str, model: bytes) -> Path:
    """A regime folder scoring ``images`` (keys and women renamed by
    ``prefix``: another test set) at site B, keeping one model file."""
    folder = root / "seed-0" / regime
    (folder / "models").mkdir(parents=True)
    renamed = [
        {**im.to_json(), "key": f"{prefix}{im.key}", "case": f"{prefix}{im.case}"}
        for im in images
    ]
    (folder / RF.DETECTIONS_JSON).write_text(json.dumps({"B": renamed}))
    (folder / "models" / "B.pt").write_bytes(model)
    return folder


def test_also_joins_the_same_models_other_test_set(tmp_path: Path) -> None:
    """Two holdouts of one study: the same models, two sets of new women.
    Joined, each side scores both sets; other models or a shared image are
    refused, naming the folders."""
    h1, h2 = tmp_path / "h1", tmp_path / "h2"
    weak, strong = _images({0, 1}, 0), _images({0, 1, 2, 3, 4, 5}, 1)
    a1 = _regime(h1, "local-only", weak, "x", b"model-a")
    _regime(h2, "local-only", weak, "y", b"model-a")
    b1 = _regime(h1, "fused", strong, "x", b"model-b")
    _regime(h2, "fused", strong, "y", b"model-b")
    alone = compare_runs.compare(a1, b1, n_boot=20)
    joined = compare_runs.compare(a1, b1, n_boot=20, also=(h1, h2))
    m1 = next(r for r in alone if r["class"] == "mass")
    m2 = next(r for r in joined if r["class"] == "mass")
    assert m1["n_images"] == 8 and m2["n_images"] == 16
    assert m2["sens_at_1fp_a"] == m1["sens_at_1fp_a"] == 0.25
    # --cases sees the joined women
    only2 = compare_runs.compare(a1, b1, n_boot=20, also=(h1, h2), cases="^yw")
    assert next(r for r in only2 if r["class"] == "mass")["n_images"] == 8
    # the other test set scored by another model: refused
    (h2 / "seed-0" / "fused" / "models" / "B.pt").write_bytes(b"retrained")
    with pytest.raises(ValueError, match=r"do not keep the same models.*B\.pt"):
        compare_runs.compare(a1, b1, n_boot=10, also=(h1, h2))
    # the same images twice is not a second test set
    _regime(tmp_path / "h3", "local-only", weak, "x", b"model-a")
    with pytest.raises(ValueError, match=r"both score image 'ximg0' of site B"):
        compare_runs.compare(a1, a1, n_boot=10, also=(h1, tmp_path / "h3"))
    with pytest.raises(ValueError, match=r"h4/seed-0/local-only .* not a regime"):
        compare_runs.compare(a1, a1, n_boot=10, also=(h1, tmp_path / "h4"))
    with pytest.raises(ValueError, match="is not under"):
        compare_runs.compare(a1, a1, n_boot=10, also=(tmp_path / "h9", h2))
    with pytest.raises(SystemExit):
        compare_runs.main(["--a", str(a1), "--b", str(a1), "--also", "h1"])
    compare_runs.main(
        ["--a", str(a1), "--b", str(a1), "--also", f"{h1}={h2}"]
        + ["--results", str(tmp_path / "r"), "--n-boot", "10"]
    )
    line = json.loads(
        (tmp_path / "r" / "compare_runs.jsonl").read_text().split("\n")[0]
    )
    assert line["context"]["also"] == f"{h1}={h2}" and line["context"]["n_images"] == 16
