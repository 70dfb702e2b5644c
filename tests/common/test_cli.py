"""common.cli: SIGTERM becomes an exception (cleanups run) and exit code 143."""

from __future__ import annotations

import os
import signal
import sys
import types
from pathlib import Path

import pytest
import torch

from common import cli
from common.errors import MammofedError


def test_sigterm_raises_inside_the_block_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(cli.Terminated):
        with cli.sigterm_raises():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                raise AssertionError("SIGTERM did not interrupt the block")
            finally:
                cleaned.append(True)
    assert cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is before


def _fake_module(name: str, run) -> str:
    mod = types.ModuleType(name)
    mod.NAME = "go"  # type: ignore[attr-defined]
    mod.HELP = "test command"  # type: ignore[attr-defined]
    mod.add_arguments = lambda p: None  # type: ignore[attr-defined]
    mod.run = run  # type: ignore[attr-defined]
    sys.modules[name] = mod
    mod.__spec__ = types.SimpleNamespace(name=name)  # type: ignore[assignment]
    return name


def test_exit_codes_of_a_subcommand(monkeypatch, capsys):
    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the command")

    def failing(args):
        raise MammofedError("bad input x.dcm")

    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())
    name = _fake_module("_mammofed_test_term", terminated)
    try:
        assert cli.main_for("prog", "", [name], ["go"]) == cli.EXIT_TERMINATED == 143
        assert "prog: terminated (SIGTERM)" in capsys.readouterr().err
        _fake_module(name, failing)
        assert cli.main_for("prog", "", [name], ["go"]) == 2
        assert "prog: error: bad input x.dcm" in capsys.readouterr().err
    finally:
        sys.modules.pop(name, None)


def test_flower_children_never_get_the_legacy_listener_switches(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With these set, a SuperLink also opens the Control and Fleet APIs on
    every interface: the environment handed to Flower drops them."""
    from common.flower_cli import LEGACY_LISTENERS, flower_env

    for name in LEGACY_LISTENERS:
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("MAMMOFED_KEEP", "yes")
    env = flower_env(tmp_path)
    assert not set(LEGACY_LISTENERS) & set(env)
    assert env["MAMMOFED_KEEP"] == "yes" and env["FLWR_HOME"] == str(tmp_path)


def test_argument_types_refuse_a_file_as_folder_a_bad_share_and_a_negative_count(
    tmp_path,
):
    import argparse

    from common.cli import count_arg, folder_arg, fraction_arg

    f = tmp_path / "model.pt"
    f.write_bytes(b"x")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file, not a folder"):
        folder_arg(str(f))
    assert folder_arg(str(tmp_path / "new")) == tmp_path / "new"
    assert folder_arg(str(tmp_path)) == tmp_path
    for bad in ("1.5", "nan", "-0.1", "1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            fraction_arg(bad)
    assert fraction_arg("0") == 0.0 and fraction_arg("0.2") == 0.2
    with pytest.raises(argparse.ArgumentTypeError, match="negative"):
        count_arg("-1")
    with pytest.raises(argparse.ArgumentTypeError, match="not an integer"):
        count_arg("1.5")
    assert count_arg("0") == 0


def test_cli_errors_not_tracebacks_for_device_out_and_shares(
    tmp_path, capsys, tiny_checkpoint
):
    """A device torch cannot parse, CUDA on a machine without it, --out naming a
    file and a share out of range: one error line and exit 2."""
    from client.cli import main as client_main

    f = tmp_path / "model.pt"
    f.write_bytes(b"x")
    img = tmp_path / "img.png"
    img.write_bytes(b"x")
    with pytest.raises(SystemExit) as info:
        client_main(["predict", "--checkpoint", str(f), str(img), "--out", str(f)])
    assert info.value.code == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        client_main([
            "evaluate", "--checkpoint", str(f), "--cache", str(tmp_path),
            "--out", str(tmp_path / "e"), "--test-fraction", "1.5",
        ])  # fmt: skip
    assert info.value.code == 2
    assert "--test-fraction" in capsys.readouterr().err
    import numpy as np
    from PIL import Image

    Image.fromarray((np.arange(96 * 96).reshape(96, 96) % 251).astype(np.uint8)).save(
        img := tmp_path / "real.png"
    )
    cases = [("tpu9", "is not a device")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "CUDA is not available"))
    for device, says in cases:
        rc = client_main([
            "predict", "--checkpoint", str(tiny_checkpoint), str(img),
            "--out", str(tmp_path / "p"), "--spacing-mm", "0.4", "--device", device,
        ])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2 and f"--device: device: {device!r} " in err and says in err
        assert "Traceback" not in err
