"""``fedavgm`` and ``fedadam``: a server optimizer step after the guarded FedAvg.

The round runs exactly as under :class:`server.strategies.base.GuardedFedAvg`
(bounded waits, reply validation, num-examples cap, norm clip,
content-order FedAvg); then the server treats ``avg_t - x_t`` (FedAvg result
minus the global model the round was sent) as a pseudo-gradient step:

* ``fedavgm``: server momentum (:class:`server.strategies.optimizers.Momentum`);
* ``fedadam``: server Adam with Flower's bias handling
  (:class:`server.strategies.optimizers.Adam`).

Only floating-point weights take the step; integer arrays and normalization
running statistics keep the FedAvg result (see
:func:`server.strategies.optimizers.takes_step`). The arrays are the shared
ones the sites send: personal layers (FedBN norms, the FedPer personal head)
never reach the server. A round that keeps the previous global model leaves
the optimizer state alone.

Why not Flower's ``FedAvgM`` / ``FedAdam`` mixed into ``GuardedFedAvg``: both
step every array, running statistics included (and an integer array would
come back float64); they record the
model in their own ``configure_train``, which ``GuardedFedAvg`` replaces with
its bounded-wait sampling (``FedAdam`` would then refuse to aggregate); and
their state is private, with no way to save it for a resumed run.

**Resume.** The strategy keeps its optimizer state in the run's checkpoint
folder, ``<run_dir>/checkpoints`` when the config names ``run_dir`` (or
wherever :meth:`ServerOptFedAvg.attach_checkpoints` says): every train
aggregation writes the state after its round, with a digest of the global
model that round produced, to ``server-opt-NNNNN.npz`` (the two newest are
kept). A run resumed at round ``r`` reloads ``server-opt-(r-1)`` if its digest
is that of the checkpoint it resumes from. Without a folder, without that
file, or with another model's file, the optimizer state restarts from zero
and a warning says so.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from common.errors import CheckpointMismatch
from common.fileio import load_arrays, save_arrays
from common.wire.federation import (
    FederationConfig,
    arrays_to_record,
    record_to_arrays,
)
from common.wire.runfolder import CHECKPOINT_DIR
from server.strategies.base import PersonalizedSummary
from server.strategies.optimizers import Adam, Momentum, ServerOptimizer

log = logging.getLogger(__name__)

__all__ = [
    "DIGEST_KEY",
    "STATE_FILE",
    "GuardedFedAdam",
    "GuardedFedAvgM",
    "ServerOptFedAvg",
    "build_fedadam",
    "build_fedavgm",
    "model_digest",
]

#: The optimizer state of round ``r`` in the checkpoint folder.
STATE_FILE = "server-opt-{round:05d}.npz"
_STATE_RE = re.compile(r"^server-opt-(\d{5,})\.npz$")
#: The state file's digest of the global model its round produced.
DIGEST_KEY = "model-digest"


def model_digest(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """A 16-byte digest (uint8) of named arrays: names, dtypes, shapes, bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8).copy()


class ServerOptFedAvg(PersonalizedSummary):
    """Guarded FedAvg followed by a :class:`ServerOptimizer` step."""

    name = "serveropt"

    def __init__(self, cfg: FederationConfig, optimizer: ServerOptimizer) -> None:
        super().__init__(cfg)
        self.optimizer = optimizer
        self._state_dir: Path | None = None
        self._started = False

    # --- resume -------------------------------------------------------------------
    def attach_checkpoints(self, directory: str | Path) -> None:
        """Persist the optimizer state in ``directory`` (the run's checkpoints)."""
        self._state_dir = Path(directory)

    def state_path(self, server_round: int) -> Path | None:
        """Where the state after ``server_round`` is kept (``None``: not attached)."""
        if self._state_dir is None:
            return None
        return self._state_dir / STATE_FILE.format(round=server_round)

    def _restart(self, server_round: int, why: str) -> None:
        log.warning(
            "%s: resuming at round %d with %s: the server optimizer state (%s) "
            "restarts from zero",
            self.name,
            server_round,
            why,
            "/".join(self.optimizer.slots),
        )

    def _restore(self, server_round: int) -> None:
        """Reload the state of ``server_round - 1`` when a run resumes there.

        Only a state written for the very global model the run resumes from
        (same digest) is used; otherwise the state restarts, with a warning.
        """
        if server_round <= 1 or not self.optimizer.stateful:
            return
        path = self.state_path(server_round - 1)
        if path is None or not path.is_file():
            self._restart(
                server_round,
                "no checkpoint folder attached" if path is None else f"no {path}",
            )
            return
        try:
            state = load_arrays(path)
            digest = state.pop(DIGEST_KEY, None)
            if digest is None or not np.array_equal(digest, model_digest(self._global)):
                self._restart(server_round, f"{path} written for another model")
                return
            self.optimizer.load_state(state, self._global)
        except (OSError, ValueError) as exc:
            raise CheckpointMismatch(
                f"{path}: unusable optimizer state: {exc}"
            ) from exc
        log.info(
            "%s: optimizer state of round %d loaded from %s",
            self.name,
            server_round - 1,
            path,
        )

    def _persist(self, server_round: int, model: Mapping[str, np.ndarray]) -> None:
        """Write the state after ``server_round`` (that made ``model``); keep two."""
        path = self.state_path(server_round)
        if path is None or not self.optimizer.stateful:
            return
        save_arrays(path, {**self.optimizer.state(), DIGEST_KEY: model_digest(model)})
        for old in path.parent.iterdir():
            m = _STATE_RE.match(old.name)
            if m and int(m.group(1)) < server_round - 1:
                old.unlink(missing_ok=True)

    # --- the round ------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As :class:`GuardedFedAvg`; the first call of a resumed run reloads state."""
        messages = super().configure_train(server_round, arrays, config, grid)
        if not self._started:
            self._started = True
            self._restore(server_round)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Guarded FedAvg of the valid updates, then the server optimizer step."""
        averaged, metrics = super().aggregate_train(server_round, replies)
        model = self._global  # kept when too few updates are valid
        if averaged is not None:
            model = self.optimizer.step(
                self._global, record_to_arrays(averaged), server_round
            )
            averaged = arrays_to_record(model)
        self._persist(server_round, model)  # also when kept: no stale file
        return averaged, metrics

    def summary(self) -> None:
        """Log the optimizer settings, then the guarded summary."""
        log.info("%s: server optimizer %s", self.name, self.optimizer.describe())
        super().summary()


class GuardedFedAvgM(ServerOptFedAvg):
    """FedAvgM: server momentum over the guarded FedAvg of the shared arrays."""

    name = "fedavgm"


class GuardedFedAdam(ServerOptFedAvg):
    """FedAdam: server Adam over the guarded FedAvg of the shared arrays."""

    name = "fedadam"


def _attach_run_dir(strategy: ServerOptFedAvg, cfg: FederationConfig) -> None:
    """Keep ``strategy``'s state in ``<cfg.run_dir>/checkpoints`` if it is set."""
    if cfg.run_dir is not None:
        strategy.attach_checkpoints(Path(cfg.run_dir) / CHECKPOINT_DIR)


def build_fedavgm(cfg: FederationConfig) -> GuardedFedAvgM:
    """Factory of ``fedavgm`` (any personalization); state under ``run_dir``."""
    s = cfg.strategy
    strategy = GuardedFedAvgM(cfg, Momentum(s.server_learning_rate, s.server_momentum))
    _attach_run_dir(strategy, cfg)
    return strategy


def build_fedadam(cfg: FederationConfig) -> GuardedFedAdam:
    """Factory of ``fedadam`` (any personalization); state under ``run_dir``."""
    s = cfg.strategy
    strategy = GuardedFedAdam(cfg, Adam(s.eta, s.beta_1, s.beta_2, s.tau))
    _attach_run_dir(strategy, cfg)
    return strategy
