"""``predict``'s research-image spacing: the flags and ``images.csv`` rows.

A spacing outside the plausible [0.01, 1.0] mm of a mammogram upsampled a
300 x 300 PNG 125 times (``--spacing-mm 50``) until memory ran out.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.cli import main as client_main
from client.predict import predict_paths
from common.errors import ConfigError


def _breast_png(path: Path) -> None:
    px = np.zeros((200, 160), np.uint8)
    px[20:180, 0:100] = 120
    px[100:120, 20:40] = 250
    Image.fromarray(px).save(path)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--spacing-mm", "50"), ("--spacing-mm", "nan"), ("--default-spacing-mm", "0")],
)
def test_predict_refuses_an_implausible_spacing_flag_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    """One line naming the flag and the value, before any model is loaded."""
    _breast_png(tmp_path / "a.png")
    rc = client_main([
        "predict", "--checkpoint", str(tmp_path / "absent.pt"), str(tmp_path / "a.png"),
        "--out", str(tmp_path / "o"), flag, value, "--device", "cpu",
    ])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert f"({flag})" in err and f"{float(value)!r} mm is outside" in err
    assert "[0.01, 1.0] mm" in err and "absent.pt" not in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError):
        predict_paths(tmp_path / "absent.pt", [tmp_path], tmp_path / "o2", **{
            flag.lstrip("-").replace("-", "_"): float(value)
        })  # fmt: skip


def test_predict_skips_an_images_csv_row_of_implausible_spacing(
    tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``images.csv`` takes the readers' plausible range: a 3 mm row's spacing
    is refused naming the row, field and value, and its image (with no other
    spacing) is skipped by name; the other image is read."""
    site = tmp_path / "site"
    site.mkdir()
    _breast_png(site / "ok.png")
    _breast_png(site / "coarse.png")
    (site / "images.csv").write_text(
        "image,patient_id,laterality,view,spacing_mm\n"
        "ok.png,w1,L,CC,0.2\n"
        "coarse.png,w2,L,CC,3\n"
    )
    with caplog.at_level(logging.WARNING):
        res = predict_paths(tiny_checkpoint, [site], tmp_path / "out", device="cpu")
    assert [p.name for p in res.written] == ["ok.json"]
    assert [Path(f).name for f, _ in res.skipped] == ["coarse.png"]
    assert "coarse.png" in res.skipped[0][1] and "spacing_mm" in res.skipped[0][1]
    logged = caplog.text
    assert "images.csv" in logged and "spacing_mm" in logged and "'3'" in logged
    assert "[0.01, 1.0]" in logged
    assert json.loads((tmp_path / "out" / "ok.json").read_text())["detections"]
