"""``mammofed-sim phantom``: exit codes, outputs, preview."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from simulation.cli import main
from tests.conftest import REPO

CFG = REPO / "configs" / "simulation" / "test.yaml"


def test_cli_writes_site_and_preview(tmp_path: Path) -> None:
    rc = main(
        [
            "phantom",
            "--scenario",
            str(CFG),
            "--out",
            str(tmp_path),
            "--site-name",
            "B",
            "--preview",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert len(list((tmp_path / "B").rglob("*.dcm"))) == 4
    assert (tmp_path / "B" / "annotations.csv").is_file()
    assert (tmp_path / "B" / "split.csv").is_file()
    assert not (tmp_path / "A").exists()
    with Image.open(tmp_path / "preview.png") as im:
        assert im.size[0] > 600 and im.size[1] > 400


def test_cli_errors(tmp_path: Path, capsys) -> None:
    assert (
        main(
            [
                "phantom",
                "--scenario",
                str(tmp_path / "none.yaml"),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "none.yaml" in capsys.readouterr().err
    rc = main(
        ["phantom", "--scenario", str(CFG), "--out", str(tmp_path), "--site-name", "Z"]
    )
    assert rc == 2
    assert "'Z'" in capsys.readouterr().err
    rc = main(
        ["phantom", "--scenario", str(CFG), "--out", str(tmp_path), "--workers", "0"]
    )
    assert rc == 2
