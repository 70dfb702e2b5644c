"""benchmarks.ensemble on a hand-made study folder (two seeds, two regimes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import ensemble
from common.detector.froc import FrocImage
from common.wire import runfolder as RF


def _images(found: set[int], seed: int) -> list[FrocImage]:
    """8 women, one image each, a mass in each; masses in ``found`` detected."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(8):
        dets = [[50.0, 50.0, 80.0, 80.0]] if i in found else []
        scores = [0.9] * len(dets)
        dets.append([300.0, 300.0, 320.0, 320.0])
        scores.append(float(rng.random() * 0.5))
        out.append(
            FrocImage(
                key=f"img{i}",
                spacing_mm=0.4,
                gt_boxes=np.array([[50.0, 50.0, 80.0, 80.0]]),
                gt_labels=np.array([0]),
                det_boxes=np.array(dets),
                det_scores=np.array(scores),
                det_labels=np.zeros(len(dets), np.int64),
                case=f"w{i}",
            )
        )
    return out


def _write(study: Path, seed: int, regime: str, images: list[FrocImage]) -> None:
    folder = study / f"seed-{seed}" / regime
    folder.mkdir(parents=True)
    (folder / RF.DETECTIONS_JSON).write_text(
        json.dumps({"B": [im.to_json() for im in images]})
    )


def test_ensemble_rows_and_self_pair_control(tmp_path: Path) -> None:
    study = tmp_path / "study"
    for s in (0, 1):
        _write(study, s, "fed", _images({0, 1, 2, 3}, s))  # finds the first half
        _write(study, s, "local", _images({4, 5, 6, 7}, 10 + s))  # the other half
    rows = ensemble.compare(study, ["fed", "local"], n_boot=50)
    mass = {r["comparison"]: r for r in rows if r["class"] == "mass"}
    assert set(mass) == {
        "ensemble-minus-fed",
        "ensemble-minus-local",
        "ensemble-minus-self-pair-fed",
        "ensemble-minus-self-pair-local",
        "self-pair-minus-fed",
        "self-pair-minus-local",
    }
    # complementary models: the ensemble finds what neither finds alone
    assert mass["ensemble-minus-fed"]["diff"] > 0.3
    assert mass["ensemble-minus-self-pair-local"]["diff"] > 0.3
    # the same regime's two seeds find the same masses: the pair adds nothing
    assert mass["self-pair-minus-fed"]["diff"] == pytest.approx(0.0, abs=0.05)
    assert all(r["n_runs"] == 2 and r["n_images"] == 8 for r in rows)


def test_ensemble_needs_two_seeds_and_the_members(tmp_path: Path) -> None:
    study = tmp_path / "study"
    _write(study, 0, "fed", _images({0}, 0))
    with pytest.raises(ValueError, match="two seed"):
        ensemble.compare(study, ["fed", "local"])
    _write(study, 1, "fed", _images({0}, 1))
    with pytest.raises(Exception, match="local"):
        ensemble.compare(study, ["fed", "local"])


def test_main_writes_json_lines(tmp_path: Path) -> None:
    study = tmp_path / "study"
    for s in (0, 1):
        _write(study, s, "fed", _images({0, 1}, s))
        _write(study, s, "local", _images({2, 3}, s))
    out = tmp_path / "results"
    assert ensemble.main(
        ["--study", str(study), "--members", "fed", "local", "--n-boot", "20",
         "--results", str(out)]
    ) == 0  # fmt: skip
    lines = (out / "ensemble.jsonl").read_text().splitlines()
    figures = {json.loads(x)["figure"] for x in lines}
    assert "ensemble-minus-fed-cpm-mass" in figures and len(lines) == 12


def test_oof_mode_fuses_crossval_runs(tmp_path: Path) -> None:
    paths = []
    for i, found in enumerate(({0, 1, 2, 3}, {4, 5, 6, 7})):
        p = tmp_path / f"oof{i}.json"
        p.write_text(
            json.dumps([{**im.to_json(), "fold": 0} for im in _images(found, i)])
        )
        paths.append(p)
    rows = ensemble.compare_oof(paths, n_boot=50)
    mass = {r["detector"]: r for r in rows if r["class"] == "mass"}
    assert set(mass) == {"run-0", "run-1", "ensemble"}
    assert mass["ensemble"]["cpm"] > mass["run-0"]["cpm"]
    assert mass["ensemble"]["minus_run_0"] > 0.3
    assert mass["run-0"]["n_lesions"] == 8
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        ensemble.compare_oof([paths[0], bad])
    out = tmp_path / "results"
    assert ensemble.main(["--oof", *map(str, paths), "--n-boot", "20",
                          "--results", str(out)]) == 0  # fmt: skip
    figures = [json.loads(x)["figure"] for x in (out / "ensemble.jsonl").open()]
    # no calcification in these images: only the mass lines
    assert "cv-ensemble-cpm-mass" in figures and len(figures) == 3


def test_gzipped_oof_files_load_and_a_bomb_or_corrupt_file_is_refused(
    tmp_path, monkeypatch
):
    import gzip

    rows = [im.to_json() for im in _images({0, 1}, seed=0)]
    plain = tmp_path / "oof.json"
    plain.write_text(json.dumps(rows))
    packed = tmp_path / "oof.json.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a, b = ensemble.load_oof(plain), ensemble.load_oof(packed)
    assert [x.to_json() for x in a] == [x.to_json() for x in b] and len(a) == len(rows)
    bad = tmp_path / "bad.json.gz"
    bad.write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(ValueError, match=r"bad\.json\.gz: not an oof_predictions"):
        ensemble.load_oof(bad)
    monkeypatch.setattr(ensemble, "MAX_OOF_BYTES", 100)
    with pytest.raises(ValueError, match="inflates past 100 bytes"):
        ensemble.load_oof(packed)


def test_the_kept_mini_mias_runs_reload_to_their_recorded_figures():
    from common.detector.froc import froc_all

    kept = Path(__file__).resolve().parents[2] / "benchmarks/results/mias_04_pretrain"
    for arm in ("base", "pt"):
        images = ensemble.load_oof(kept / f"oof_predictions-{arm}-seed0.json.gz")
        assert len(images) == 222
        cpm = froc_all(images, n_boot=0)["mass"].cpm
        recorded = json.loads((kept / f"cv_metrics-{arm}-seed0.json").read_text())
        assert cpm == pytest.approx(recorded["classes"]["mass"]["cpm"])
