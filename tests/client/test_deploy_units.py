"""deploy/*.service: own user, read-only code, writable state and cache only."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = ("mammofed-client.service", "mammofed-dicom.service")
WRITABLE = {"/var/lib/mammofed", "/var/cache/mammofed"}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values...]}}`` of a systemd unit (continuations joined)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if buf:
            buf += " " + line.strip()
        else:
            buf = line.strip()
        if buf.endswith("\\"):
            buf = buf[:-1].rstrip()
            continue
        logical.append(buf)
        buf = ""
    for line in logical:
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key, [])
    assert len(values) == 1, f"{key}: expected one value, got {values}"
    return values[0]


@pytest.mark.parametrize("name", UNITS)
def test_unit_hardening(name: str) -> None:
    unit = parse_unit((DEPLOY / name).read_text())
    svc = unit["Service"]
    assert _one(svc, "User") == "mammofed" and _one(svc, "Group") == "mammofed"
    assert _one(svc, "ProtectSystem") == "strict"
    assert _one(svc, "ProtectHome") == "yes"
    assert _one(svc, "NoNewPrivileges") == "yes"
    assert _one(svc, "PrivateTmp") == "yes"
    assert _one(svc, "CapabilityBoundingSet") == ""
    assert _one(svc, "Restart") == "on-failure"
    assert set(_one(svc, "ReadWritePaths").split()) == WRITABLE
    assert _one(svc, "StateDirectory") == "mammofed"
    assert _one(svc, "CacheDirectory") == "mammofed"
    assert "ReadOnlyPaths" not in svc or all(
        p not in WRITABLE for p in _one(svc, "ReadOnlyPaths").split()
    )
    exec_start = _one(svc, "ExecStart").split()
    assert exec_start[0] == "/opt/mammofed/venv/bin/mammofed-client"
    # the code lives under /opt, which ProtectSystem=strict keeps read-only
    assert not any(p.startswith("/opt") for p in WRITABLE)
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_client_unit_runs_the_supervised_supernode_with_health() -> None:
    svc = parse_unit((DEPLOY / UNITS[0]).read_text())["Service"]
    argv = _one(svc, "ExecStart").split()
    assert argv[1] == "start" and "--health-address" in argv
    assert argv[argv.index("--health-address") + 1].startswith("127.0.0.1:")
    assert "--insecure" not in argv and "--root-certificates" in argv
    from client.cli import main

    # every flag of the unit is one `mammofed-client start` knows
    with pytest.raises(SystemExit) as exc:
        main(["start", "--help"])
    assert exc.value.code == 0
    import argparse

    from client.commands import start

    parser = argparse.ArgumentParser()
    start.add_arguments(parser)
    known = {s for a in parser._actions for s in a.option_strings}
    assert {a for a in argv[2:] if a.startswith("--")} <= known


def test_dicom_unit_runs_serve() -> None:
    svc = parse_unit((DEPLOY / UNITS[1]).read_text())["Service"]
    argv = _one(svc, "ExecStart").split()
    assert argv[1:3] == ["serve", "--site-config"]


def test_parser_refuses_what_the_test_relies_on() -> None:
    bad = parse_unit("[Service]\nUser=root\nProtectSystem=full\n")["Service"]
    with pytest.raises(AssertionError):
        assert _one(bad, "ProtectSystem") == "strict"
    joined = parse_unit("[Service]\nExecStart=/a \\\n    --b c\n")["Service"]
    assert joined["ExecStart"] == ["/a --b c"]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)
@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    # the unit names the installed path; point it at this checkout's script
    script = Path(sys.executable).parent / "mammofed-client"
    text = (DEPLOY / name).read_text()
    text = text.replace("/opt/mammofed/venv/bin/mammofed-client", str(script))
    unit = tmp_path / name
    unit.write_text(text)
    res = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
