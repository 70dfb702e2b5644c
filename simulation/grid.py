"""An in-process Flower ``Grid``: the real ServerApp loop talks to real ClientApps.

:class:`InProcessGrid` hands each Flower ``Message`` straight to the
``ClientApp`` (``client.app.app``) with that node's ``Context``: the same
messages, records, client guard and server validation as a deployment, minus
the network and the per-message process start. It is the fast engine of
``mammofed-sim run`` on a small CPU machine; ``--engine ray`` runs the same app
on Flower's simulation engine (``simulation.ray_engine``), and deployments run
it as a SuperLink plus SuperNode processes (``mammofed-server`` /
``mammofed-client start``).

Every reply is logged in :attr:`InProcessGrid.log`: round, phase, node, site,
metrics, bytes of the arrays sent and the seconds the node spent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from common.keys import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, SERVER_ROUND
from common.wire.federation import NODE_DATA_DIR, NODE_SITE, NODE_STATE_DIR

log = logging.getLogger(__name__)


@dataclass
class ReplyLog:
    """One node's reply to one message."""

    round: int
    phase: str
    node: int
    site: str
    seconds: float
    bytes_sent: int
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def array_bytes(content: RecordDict) -> int:
    """Bytes of every array a reply carries (what crosses the network)."""
    records = content.array_records.values()
    return sum(len(arr.data) for record in records for arr in record.values())


class InProcessGrid(Grid):
    """A Grid whose nodes are ``ClientApp`` calls in this process.

    Args:
        app: the ``ClientApp`` (callable as ``app(message, context)``).
        sites: ``{node_id: (site, state_dir, data_dir)}``.
        run_config: the run config every node's ``Context`` carries.
    """

    def __init__(
        self,
        app: Callable[[Message, Context], Message],
        sites: dict[int, tuple[str, str, str | None]],
        run_config: dict[str, Any],
    ) -> None:
        self.app = app
        self.site_of = {node: s[0] for node, s in sites.items()}
        self.contexts: dict[int, Context] = {}
        for node, (site, state_dir, data_dir) in sites.items():
            node_config: dict[str, Any] = {NODE_SITE: site, NODE_STATE_DIR: state_dir}
            if data_dir:
                node_config[NODE_DATA_DIR] = data_dir
            self.contexts[node] = Context(
                run_id=1,
                node_id=node,
                node_config=node_config,
                state=RecordDict(),
                run_config=dict(run_config),
            )
        self.offline: set[int] = set()
        self.log: list[ReplyLog] = []
        # What a ServerApp process has set before its main() runs.
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 1
        TaskIdentity.task_id = 1

    # Grid's abstract API; only what the server loop uses is implemented.
    def set_run(self, run: Any) -> None:
        """Unused in-process (one run per grid)."""

    @property
    def run(self) -> Any:
        """No Flower run object in-process."""
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Not used by the server loop (it builds ``Message`` itself)."""
        raise NotImplementedError("InProcessGrid does not create messages")

    def get_node_ids(self) -> Iterable[int]:
        """Nodes currently reachable."""
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not used: :meth:`send_and_receive` delivers synchronously."""
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Not used: :meth:`send_and_receive` delivers synchronously."""
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver each message to its node's ClientApp; a crash becomes an Error."""
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.offline or node not in self.contexts:
                continue
            t0 = time.perf_counter()
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as exc:  # what a SuperNode reports for a crash
                log.exception("node %s (%s) failed", node, self.site_of.get(node))
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=msg)
            self._record(msg, reply, node, time.perf_counter() - t0)
            out.append(reply)
        return out

    def _record(self, msg: Message, reply: Message, node: int, seconds: float) -> None:
        cfg = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
        entry = ReplyLog(
            round=int(cfg.get(SERVER_ROUND, 0)),  # type: ignore[arg-type]
            phase=str(msg.metadata.message_type),
            node=node,
            site=self.site_of.get(node, "?"),
            seconds=round(seconds, 3),
            bytes_sent=0,
        )
        if reply.has_error():
            entry.error = str(reply.error.reason)
        else:
            if ARRAYS_KEY in reply.content.array_records:
                entry.bytes_sent = array_bytes(reply.content)
            m = reply.content.metric_records.get(METRICS_KEY)
            entry.metrics = dict(m) if m is not None else {}
        self.log.append(entry)
