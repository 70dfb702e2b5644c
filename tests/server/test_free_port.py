"""``server.process.free_port``: ports a child process binds later.

A port picked now and bound later by another process must not be one the
kernel may hand to anyone else meanwhile. ``bind(0)`` gives ephemeral ports,
the range every other ``bind(0)`` and outgoing connection draws from: CI
once saw a SuperNode's ``--port`` taken by the SuperNode's own helper server
(``Port ... is already in use``), so the port came up and the node never did.
"""

from __future__ import annotations

import socket

import pytest

from server import process
from server.process import ephemeral_port_range, free_port


def test_ports_come_from_below_the_ephemeral_range_and_never_twice():
    lo, hi = ephemeral_port_range()
    assert 1024 < lo <= hi
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(1024 < p < lo for p in ports)
    for p in ports[:5]:  # each one is bindable right after
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", p))


def test_a_taken_port_is_not_handed_out(monkeypatch: pytest.MonkeyPatch):
    """Every draw but the last lands on a port in use: the free one is returned."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        lo = ephemeral_port_range()[0]
        spare = free_port()  # free now, never handed out again by free_port
        process._HANDED.discard(spare)
        draws = iter([taken] * 3 + [spare])

        class Rng:
            def randrange(self, a: int, b: int) -> int:
                return next(draws)

        monkeypatch.setattr("random.SystemRandom", Rng)
        monkeypatch.setattr(process, "ephemeral_port_range", lambda: (lo, lo))
        assert free_port() == spare


def test_unreadable_range_falls_back_to_linux_default(monkeypatch: pytest.MonkeyPatch):
    def broken(self, *a, **k):  # type: ignore[no-untyped-def]
        raise OSError("no /proc here")

    monkeypatch.setattr(process.Path, "read_text", broken)
    assert ephemeral_port_range() == (32768, 60999)
