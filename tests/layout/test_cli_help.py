"""The CLIs: ``--help`` imports no torch or flwr, shows defaults, one name per flag.

Every subcommand module is imported to build the parser, so each keeps its top
light and imports heavy code inside ``run`` (see :mod:`common.cli`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from client.cli import main as client_main
from common.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "flwr")

#: In a fresh interpreter: import each command module, noting the first one after
#: which a heavy package is loaded, then print every subcommand's --help.
PROBE = """
import contextlib, importlib, importlib.util, io, json, sys
from {pkg}.cli import MODULES, main
culprit = None
for name in MODULES:
    if importlib.util.find_spec(name) is not None:
        importlib.import_module(name)
        if culprit is None and any(h in sys.modules for h in {heavy!r}):
            culprit = name
commands = [None] + [importlib.import_module(m).NAME for m in MODULES
                     if importlib.util.find_spec(m) is not None]
for cmd in commands:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(["--help"] if cmd is None else [cmd, "--help"])
print(json.dumps({{"culprit": culprit, "heavy": [h for h in {heavy!r}
                                             if h in sys.modules]}}))
"""


@pytest.mark.parametrize("pkg", ["client", "server", "simulation"])
def test_help_of_every_command_imports_no_torch_or_flwr(pkg):
    res = subprocess.run(
        [sys.executable, "-c", PROBE.format(pkg=pkg, heavy=HEAVY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert found == {"culprit": None, "heavy": []}, (
        f"{found['culprit']} imports {found['heavy']} at its top; import it "
        "inside run()"
    )


def _options(pkg: str) -> dict[str, list[str]]:
    """``--flag -> [command, ...]`` over every subcommand of ``pkg``'s CLI."""
    modules = __import__(f"{pkg}.cli", fromlist=["MODULES"]).MODULES
    parser = build_parser(pkg, "", modules)
    sub = next(a for a in parser._actions if a.choices and a.dest == "command")
    out: dict[str, list[str]] = {}
    for command, p in sub.choices.items():
        for action in p._actions:
            for flag in action.option_strings:
                out.setdefault(flag, []).append(command)
    return out


@pytest.mark.parametrize("pkg", ["client", "server", "simulation"])
def test_no_command_takes_the_ambiguous_site_flag(pkg):
    # --site meant a YAML, a site name and a cache folder in three commands
    options = _options(pkg)
    assert "--site" not in options
    assert "--seed" not in options.get("evaluate", [])  # --boot-seed there


def test_help_shows_defaults_but_not_empty_ones(capsys):
    with pytest.raises(SystemExit):
        client_main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "bootstrap draws (default: 1000)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_defaults_repeated_for_a_light_help_equal_the_library_ones():
    from client.commands import export_onnx, predict
    from client.dicom_derived import DEFAULT_SCORE_FLOOR
    from client.onnx_export import DEFAULT_OPSET
    from client.predict import FORMATS

    assert predict.FORMATS == FORMATS
    assert predict.SR_DISPLAY_FLOOR == DEFAULT_SCORE_FLOOR
    parser = build_parser("client", "", ["client.commands.export_onnx"])
    args = parser.parse_args(["export-onnx", "--checkpoint", "c", "--out", "o"])
    assert args.opset == DEFAULT_OPSET
    assert export_onnx.NAME == "export-onnx"
