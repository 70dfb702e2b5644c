"""common.cli: SIGTERM becomes an exception (cleanups run) and exit code 143."""

from __future__ import annotations

import os
import signal
import sys
import types
from pathlib import Path

import pytest

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
