"""``mammofed-server`` verbs given bad files: one line naming the flag, exit 2.

Each case used to end in a traceback (``ssl.SSLError``, ``IsADirectoryError``,
``FileExistsError``). Nothing is started: the SuperLink and the gateway are
stand-ins, and the checks run before either would be.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

import server.fleet_gateway
import server.process
from common.wire.tls import generate_certificates
from server.cli import main

FILES = ("ca.crt", "server.pem", "server.key")


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What ``start`` would have launched (nothing is)."""
    launched: list[str] = []

    def gateway(cfg: object) -> contextlib.AbstractContextManager[None]:
        launched.append("gateway")
        return contextlib.nullcontext()

    def superlink(cmd: list[str], **_: object) -> int:
        launched.append("superlink")
        return 0

    monkeypatch.setattr(server.fleet_gateway, "FleetGateway", gateway)
    monkeypatch.setattr(server.process, "run_foreground", superlink)
    return launched


def _garbage_tls(tmp_path: Path) -> Path:
    bad = tmp_path / "badtls"
    bad.mkdir()
    for name in FILES:
        (bad / name).write_text("garbage\n")
        (bad / name).chmod(0o600)
    return bad


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    return line


@pytest.mark.parametrize(
    ("good", "bad_file", "why"),
    [
        ((), "ca.crt", "is not a PEM certificate"),
        (("ca.crt",), "server.pem", "is not a PEM certificate"),
        (
            ("ca.crt", "server.pem"),
            "server.key",
            "is not an unencrypted PEM private key",
        ),
    ],
)
def test_start_refuses_tls_files_that_hold_no_pem(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    started: list[str],
    good: tuple[str, ...],
    bad_file: str,
    why: str,
) -> None:
    pki = tmp_path / "pki"
    generate_certificates(pki, ["localhost", "127.0.0.1"])
    bad = _garbage_tls(tmp_path)
    for name in good:
        shutil.copy(pki / name, bad / name)
    argv = ["start", "--tls-dir", str(bad), "--fleet-host", "127.0.0.1"]
    assert main(argv) == 2
    assert _error(capsys) == (
        f"mammofed-server: error: command line: --tls-dir: {bad / bad_file} {why}"
    )
    assert started == []


def test_start_refuses_a_key_that_is_not_the_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], started: list[str]
) -> None:
    generate_certificates(tmp_path / "a", ["localhost"])
    generate_certificates(tmp_path / "b", ["localhost"])
    argv = [
        "start",
        "--ssl-ca-certfile",
        str(tmp_path / "a" / "ca.crt"),
        "--ssl-certfile",
        str(tmp_path / "a" / "server.pem"),
        "--ssl-keyfile",
        str(tmp_path / "b" / "server.key"),
    ]
    assert main(argv) == 2
    assert _error(capsys).endswith(
        f"--ssl-keyfile: {tmp_path / 'b' / 'server.key'} is not the private key "
        f"of {tmp_path / 'a' / 'server.pem'}"
    )
    assert started == []
    # the matching files still start
    argv[-1] = str(tmp_path / "a" / "server.key")
    assert main(argv) == 0 and started == ["superlink"]


def test_sign_app_refuses_a_directory_as_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sign-app", "--key", str(tmp_path), "--apps-dir", str(tmp_path / "x")]
    assert main(argv) == 2
    assert _error(capsys) == (
        f"mammofed-server: error: command line: --key: {tmp_path} is a directory"
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["certs", "--out"],
        ["signing-key", "--out"],
        ["node-key", "--site-name", "h", "--out"],
        ["sign-app", "--key", "k", "--apps-dir"],
    ],
)
def test_an_output_folder_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    afile = tmp_path / "ca.crt"
    afile.write_text("keep me\n")
    with pytest.raises(SystemExit) as exc:
        main([*argv, str(afile)])
    assert exc.value.code == 2
    assert _error(capsys).endswith(f"{str(afile)!r} is a file, not a folder")
    assert afile.read_text() == "keep me\n"
