"""``mammofed-client evaluate`` writes error galleries and the size table."""

from __future__ import annotations

import json

import pytest

from client.cli import main as client_main
from client.evaluate import METRICS_JSON, NothingToEvaluate, evaluate_checkpoint
from common.detector.errors import BY_SIZE_KEY, ERRORS_KEY, SizeTable, gallery_name
from common.keys import CALCIFICATION, CLASSES, MASS
from tests.conftest import LESION

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_evaluate_writes_galleries_and_size_table(
    tiny_checkpoint, site_cache, tmp_path
):
    out = tmp_path / "eval"
    doc = evaluate_checkpoint(
        tiny_checkpoint, site_cache, out, view="all", n_boot=0, device="cpu",
        gallery_missed=3, gallery_fp=5,
    )  # fmt: skip
    assert json.loads((out / METRICS_JSON).read_text()) == doc
    for name in CLASSES:
        png = out / gallery_name(name)
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000, name
    mass = SizeTable.from_json(doc[BY_SIZE_KEY][MASS])
    # 6 patients, one 24 px (9.6 mm at 0.4 mm) mass each: all in the 5-10 bin
    assert mass.n_lesions == doc["classes"][MASS]["n_lesions"] == 6
    assert [b.n_lesions for b in mass.bins] == [0, 6, 0, 0]
    assert LESION[2] - LESION[0] == 24
    # the table agrees with the FROC sensitivity at 1 FP/image
    assert mass.n_found / 6 == pytest.approx(doc["metrics"]["sens-mass-at-1"])
    assert mass.fp_per_image <= 1.0
    cases = doc[ERRORS_KEY][MASS]
    assert cases["gallery"] == gallery_name(MASS)
    assert len(cases["missed"]) == min(3, cases["n_missed"])
    assert cases["n_missed"] == 6 - mass.n_found
    assert len(cases["false_positives"]) == min(5, cases["n_false_positives"])
    scores = [c["score"] for c in cases["false_positives"]]
    assert scores == sorted(scores, reverse=True)
    # no calcification in the cache: no lesion, an empty size table
    calc = SizeTable.from_json(doc[BY_SIZE_KEY][CALCIFICATION])
    assert calc.n_lesions == 0 and calc.sensitivity is None
    assert doc[ERRORS_KEY][CALCIFICATION]["missed"] == []


def test_cli_gallery_sizes(tiny_checkpoint, site_cache, tmp_path):
    out = tmp_path / "eval"
    argv = [
        "evaluate", "--checkpoint", str(tiny_checkpoint), "--cache", str(site_cache),
        "--out", str(out), "--view", "all", "--n-boot", "0", "--device", "cpu",
    ]  # fmt: skip
    assert client_main([*argv, "--gallery-missed", "0", "--gallery-fp", "0"]) == 0
    doc = json.loads((out / METRICS_JSON).read_text())
    assert doc[BY_SIZE_KEY][MASS]["n_lesions"] == 6  # the table is always written
    assert doc[ERRORS_KEY][MASS]["gallery"] is None
    assert not list(out.glob("errors-*.png"))
    with pytest.raises(SystemExit) as exc:
        client_main([*argv, "--gallery-fp", "-1"])
    assert exc.value.code == 2


def test_empty_view_is_a_one_line_error(tiny_checkpoint, site_cache, tmp_path, capsys):
    # test_fraction 0 puts every patient in train: the test view is empty
    with pytest.raises(NothingToEvaluate, match="view 'test' has no images"):
        evaluate_checkpoint(
            tiny_checkpoint, site_cache, tmp_path / "e", test_fraction=0.0,
            n_boot=0, device="cpu",
        )  # fmt: skip
    rc = client_main([
        "evaluate", "--checkpoint", str(tiny_checkpoint), "--cache", str(site_cache),
        "--out", str(tmp_path / "e2"), "--test-fraction", "0", "--device", "cpu",
    ])  # fmt: skip
    assert rc == 2
    assert "view 'test' has no images to evaluate" in capsys.readouterr().err
    with pytest.raises(ValueError, match="gallery_missed must be >= 0, got -1"):
        evaluate_checkpoint(
            tiny_checkpoint, site_cache, tmp_path / "e3", gallery_missed=-1
        )
