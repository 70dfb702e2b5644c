"""What a site's daemon has done and whether it can go on (``mammofed-client status``).

Read-only: every value comes from the site's own disk (its state folder under
``<state_dir>/<site>/``, see :mod:`client.state`, the DP accountant of
:mod:`common.detector.dp`, the DICOM node's outbox) and, optionally, from the
SuperNode's gRPC health service. Nothing is sent anywhere.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client.state import PERSONAL_NPZ, SiteState, SiteStateError
from common.config.site import SiteConfig
from common.errors import MammofedError
from common.fileio import sha256_file

#: Below this much free space on the state folder's disk, health reports it.
MIN_FREE_BYTES = 1 << 30


@dataclass(frozen=True)
class ModelVersionInfo:
    """The site's committed personal state.

    Attributes:
        round: server round whose personal state is committed (0: none yet).
        sha256: first 16 hex digits of ``personal.npz``'s SHA-256 (``None``
            when the site has no personal arrays).
        pending_round: a trained round still awaiting the server's verdict.
    """

    round: int
    sha256: str | None
    pending_round: int | None


@dataclass(frozen=True)
class DPBudget:
    """Privacy spent by the site's DP-SGD training (``common.detector.dp``)."""

    epsilon: float
    target_epsilon: float
    delta: float
    steps: int


@dataclass(frozen=True)
class OutboxInfo:
    """Files waiting in the DICOM node's outbox (``dicom_node.queue_dir``)."""

    queue_dir: str
    queued: int
    failed: int


@dataclass(frozen=True)
class SiteStatus:
    """Everything ``mammofed-client status`` reports.

    Attributes:
        site: the site name; state_dir: its state folder.
        last_round: last server round the site took part in (0: none).
        last_phase: ``train`` or ``evaluate`` of that round.
        model: committed personal state; dp: privacy spent (``None`` without
            DP); outbox: DICOM outbox (``None`` without a DICOM node).
        supernode: ``serving``, ``not serving``, ``unreachable (...)`` or
            ``not checked``.
        problems: one line per problem found; empty when healthy.
    """

    site: str
    state_dir: str
    last_round: int
    last_phase: str | None
    model: ModelVersionInfo
    dp: DPBudget | None
    outbox: OutboxInfo | None
    supernode: str
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """JSON form (``--json``)."""
        return {**asdict(self), "healthy": self.healthy}

    def to_text(self) -> str:
        """Human form, one fact per line."""
        m, d, o = self.model, self.dp, self.outbox
        dp = (
            "not training under DP"
            if d is None
            else f"epsilon {d.epsilon:.3f} of {d.target_epsilon:g} "
            f"(delta {d.delta:.2g}, {d.steps} steps)"
        )
        outbox = (
            "no DICOM node configured"
            if o is None
            else f"{o.queued} queued, {o.failed} failed ({o.queue_dir})"
        )
        lines = [
            f"site:            {self.site}",
            f"state folder:    {self.state_dir}",
            f"last round:      {self.last_round}"
            + (f" ({self.last_phase})" if self.last_phase else ""),
            f"model version:   round {m.round}, personal state "
            + (f"sha256 {m.sha256}" if m.sha256 else "none")
            + (f", round {m.pending_round} pending" if m.pending_round else ""),
            f"DP budget:       {dp}",
            f"DICOM outbox:    {outbox}",
            f"SuperNode:       {self.supernode}",
            "health:          " + ("ok" if self.healthy else "PROBLEMS"),
            *(f"  - {p}" for p in self.problems),
        ]
        return "\n".join(lines)


def _count_files(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    files = (p for p in folder.iterdir() if p.is_file())
    return sum(1 for p in files if not p.name.startswith("."))


def outbox_info(site: SiteConfig) -> OutboxInfo | None:
    """Queued and failed files of the site's DICOM outbox, if it has a node."""
    node = getattr(site, "dicom_node", None)
    if node is None:
        return None
    queue = Path(node.queue_dir)
    return OutboxInfo(str(queue), _count_files(queue), _count_files(queue / "failed"))


def dp_budget(state_dir: Path) -> DPBudget | None:
    """Privacy spent so far, or ``None`` when the site never trained under DP."""
    from common.detector.dp import read_accountant  # imports torch / opacus: only here

    acc = read_accountant(state_dir)
    if acc is None:
        return None
    return DPBudget(
        float(acc["epsilon"]),
        float(acc["target_epsilon"]),
        float(acc["delta"]),
        int(acc["steps"]),
    )


def supernode_health(address: str, timeout_s: float = 2.0) -> str:
    """Ask Flower's gRPC health service at ``address`` (``grpc.health.v1``)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            res = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"unreachable at {address} ({exc.code().name})"
    if res.status == health_pb2.HealthCheckResponse.SERVING:
        return "serving"
    return f"not serving at {address} (status {res.status})"


def site_status(site: SiteConfig, health_address: str | None = None) -> SiteStatus:
    """Collect the status of ``site`` (a loaded site config).

    ``health_address``: ``host:port`` of the SuperNode's health service, or
    ``None`` not to ask. Raises :class:`MammofedError` when the config names
    no state folder.
    """
    if site.state_dir is None:
        raise MammofedError(f"site {site.name}: the site config names no state_dir")
    problems: list[str] = []
    site_dir = Path(site.state_dir) / site.name
    if not site_dir.is_dir():
        problems.append(f"state folder {site_dir} does not exist (never federated?)")
    elif not os.access(site_dir, os.W_OK | os.X_OK):
        problems.append(f"state folder {site_dir} is not writable by this user")
    meta: dict[str, Any] = {}
    pending: dict[str, int] | None = None
    sha = None
    if site_dir.is_dir():
        state = SiteState(site.state_dir, site.name)
        try:
            meta = state.read_meta()
        except SiteStateError as exc:
            problems.append(str(exc))
        try:
            pending = state.pending()
        except SiteStateError as exc:
            problems.append(str(exc))
        personal = site_dir / PERSONAL_NPZ
        if personal.is_file():
            try:
                state.load_personal()
                sha = sha256_file(personal)[:16]
            except SiteStateError as exc:
                problems.append(str(exc))
        free = shutil.disk_usage(site_dir).free
        if free < MIN_FREE_BYTES:
            problems.append(f"only {free / 2**20:.0f} MiB free on {site_dir}'s disk")
    dp = None
    try:
        dp = dp_budget(site_dir)
    except MammofedError as exc:
        problems.append(str(exc))
    if dp is not None and dp.epsilon >= dp.target_epsilon:
        problems.append(
            f"DP budget spent (epsilon {dp.epsilon:.3f} >= {dp.target_epsilon:g}): "
            "the site replies without training"
        )
    supernode = "not checked"
    if health_address:
        supernode = supernode_health(health_address)
        if supernode != "serving":
            problems.append(f"SuperNode {supernode}")
    model = ModelVersionInfo(
        round=int(meta.get("committed_round", 0)),
        sha256=sha,
        pending_round=pending["round"] if pending else None,
    )
    return SiteStatus(
        site=site.name,
        state_dir=str(site_dir),
        last_round=int(meta.get("last_round", 0)),
        last_phase=meta.get("last_phase"),
        model=model,
        dp=dp,
        outbox=outbox_info(site),
        supernode=supernode,
        problems=problems,
    )
