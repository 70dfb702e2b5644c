"""``--version`` on the three entry points: package, torch and flwr versions."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

from client.cli import main as client_main
from common import cli
from server.cli import main as server_main
from simulation.cli import main as sim_main

ENTRY_POINTS = {
    "mammofed-client": client_main,
    "mammofed-server": server_main,
    "mammofed-sim": sim_main,
}


@pytest.mark.parametrize("prog", sorted(ENTRY_POINTS))
def test_version_prints_package_torch_and_flwr(
    prog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        ENTRY_POINTS[prog](["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == (
        f"{prog} {metadata.version('mammofed')} "
        f"(torch {metadata.version('torch')}, flwr {metadata.version('flwr')})"
    )


def test_version_names_an_absent_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "VERSIONED_PACKAGES", ("mammofed", "no-such-dist-xyz"))
    assert cli.version_string("p").endswith("(no-such-dist-xyz absent)")


def test_version_works_from_the_installed_script() -> None:
    # the console script (not only main()) answers, without a subcommand
    res = subprocess.run(
        [sys.executable, "-m", "client.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("mammofed-client ")
    assert "flwr " in res.stdout and "torch " in res.stdout
