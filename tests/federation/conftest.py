"""Fixtures for the federation tests: an in-process Grid driving real ClientApps."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from common.wire.federation import (
    NODE_SITE,
    NODE_STATE_DIR,
    RUN_FEDERATION_JSON,
    FederationConfig,
    federation_config_to_json,
    load_federation_config,
)

REPO = Path(__file__).resolve().parents[2]
TEST_YAML = REPO / "configs" / "federation" / "test.yaml"


class LocalGrid(Grid):
    """Calls ``app(message, context)`` directly; records every reply sent.

    ``tamper`` (node_id, reply) -> reply lets a test corrupt one node's update.
    """

    def __init__(
        self,
        app: Any,
        contexts: dict[int, Context],
        tamper: Callable[[int, Message], Message] | None = None,
    ) -> None:
        self.app = app
        self.contexts = contexts
        self.tamper = tamper
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.offline: set[int] = set()
        # what a real ServerApp process has set before main() runs
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 1
        TaskIdentity.task_id = 1

    def set_run(self, run: Any) -> None:  # pragma: no cover - unused
        self._run = run

    @property
    def run(self) -> Any:  # pragma: no cover - unused
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(
        self, messages: Iterable[Message]
    ) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(
        self, message_ids: Iterable[str]
    ) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.offline:
                continue
            self.sent.append(msg)
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as exc:  # what a SuperNode does with a crash
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=msg)
            if self.tamper is not None and not reply.has_error():
                reply = self.tamper(node, reply)
            self.replies.append(reply)
            out.append(reply)
        return out


def make_contexts(
    cfg: FederationConfig, state_dir: Path, sites: list[str]
) -> dict[int, Context]:
    run_config = {RUN_FEDERATION_JSON: federation_config_to_json(cfg)}
    return {
        100 + i: Context(
            run_id=1,
            node_id=100 + i,
            node_config={NODE_SITE: site, NODE_STATE_DIR: str(state_dir)},
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for i, site in enumerate(sites)
    }


@pytest.fixture
def test_cfg(tmp_path: Path) -> FederationConfig:
    cfg = load_federation_config(TEST_YAML)
    return dataclasses.replace(
        cfg,
        run_dir=tmp_path / "run",
        state_dir=tmp_path / "state",
        participation=dataclasses.replace(cfg.participation, wait_for_nodes_s=0.5),
    )


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def flower_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """A list to append started Flower processes to (each in its own group).

    Teardown, also when the test failed: stop every group (SIGTERM, then
    SIGKILL), wait for grandchildren to go, and fail if any group is left.
    """
    from server.process import stop_process

    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    # start_new_session: each group id is its leader's pid, even once it exited
    groups = [proc.pid for proc in procs]
    for proc in procs:
        stop_process(proc)
    for pgid in groups:
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 15  # killed grandchildren are reaped by init
    while any(_group_alive(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_group_alive(g) for g in groups), "processes left running"
