"""One federated regime as a real deployment on loopback (engine ``deployment``).

:func:`run_federated_deployment` starts what hospitals and the coordinator run
(``mammofed-server start`` / ``mammofed-client start``), on one machine:

* one SuperLink (``flower-superlink``, ``--insecure`` on ``127.0.0.1``, free
  ports);
* one SuperNode process per site (``flower-supernode``), whose node config
  names the site, its state folder and its cache (``site``, ``state-dir``,
  ``data-dir``), so the ClientApp reads exactly that site's data;
* the run itself through the Control API (:func:`server.launch.submit_run`,
  followed with :func:`server.launch.follow_run`).

The sites train *in parallel*, as separate processes, unlike the in-process
engine: this is the engine for the benchmark scenario on a GPU box (Ray does
not fit there) and for measuring the round overhead against the slowest site.
Give every site ``trainer.options.threads`` so that the SuperNodes together do
not oversubscribe the cores.

Every process gets its own ``FLWR_HOME`` under ``<run_dir>/deploy/``; all of
them (and whatever they spawned: ClientApp and ServerApp processes inherit the
variable) are stopped afterwards, on success, failure or timeout, with
:func:`simulation.ray_engine.kill_home_processes`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

from client.supernode import supernode_argv
from common.errors import MammofedError
from common.fileio import tail_text
from common.flower_cli import flower_env
from common.wire.federation import (
    NODE_DATA_DIR,
    NODE_SITE,
    NODE_STATE_DIR,
    FederationConfig,
)
from server.launch import FLWR_HOME_DIR, Connection, follow_run, submit_run
from server.process import (
    ProcessError,
    free_port,
    start_process,
    superlink_command,
    wait_for_port,
)
from simulation.ray_engine import kill_home_processes

log = logging.getLogger(__name__)

#: Sub-folder of the regime's server run dir with the processes' homes and logs.
DEPLOY_DIR = "deploy"
SUPERLINK_LOG = "superlink.log"
#: The state a finished run reports (``flwr ls``).
FINISHED_OK = "finished:completed"
#: A run with a round that aggregated nothing (``server.faults.outcome_status``).
FINISHED_DEGRADED = "finished:degraded"


class DeploymentEngineError(MammofedError):
    """The loopback deployment failed, timed out or could not be started."""


def run_federated_deployment(
    fed: FederationConfig,
    caches: Mapping[str, Path],
    run_dir: Path,
    *,
    timeout_s: float = 3600.0,
) -> Path:
    """Run ``fed`` on a loopback SuperLink with one SuperNode per site.

    Args:
        fed: the federation (``state_dir`` must be set: the sites' state).
        caches: site name -> that site's cache folder (``fed.sites`` all present).
        run_dir: the server run folder (checkpoints, ``rounds.jsonl``).
        timeout_s: the whole run's limit; the run is stopped after it.

    Returns ``run_dir``. Raises :class:`DeploymentEngineError` naming the
    failing process and the tail of its log; nothing is left running.
    """
    if fed.state_dir is None:
        raise DeploymentEngineError("engine 'deployment' needs fed.state_dir")
    missing = [s for s in fed.sites if s not in caches]
    if missing:
        raise DeploymentEngineError(f"no cache for site(s) {missing}")
    run_dir = Path(run_dir).resolve()
    base = run_dir / DEPLOY_DIR
    base.mkdir(parents=True, exist_ok=True)
    homes: list[Path] = []
    port = free_port()
    t0 = time.monotonic()

    def start(cmd: list[str], name: str, log_name: str) -> None:
        """Start ``cmd`` with ``FLWR_HOME`` ``base/home-<name>``, output to a log."""
        homes.append(base / f"home-{name}")
        start_process(
            cmd, log_path=base / log_name, env=flower_env(homes[-1]), cwd=base
        )

    def failure(what: str) -> DeploymentEngineError:
        tail = tail_text(base / SUPERLINK_LOG)
        return DeploymentEngineError(f"{what}; SuperLink log:\n{tail}")

    try:
        start(superlink_command(port=port, insecure=True), "superlink", SUPERLINK_LOG)
        if not wait_for_port("127.0.0.1", port, 60):
            raise failure("SuperLink did not come up in 60 s")
        # absolute paths: the ClientApp runs in its own process and folder
        state_dir = str(Path(fed.state_dir).resolve())
        for site in fed.sites:
            data_dir = str(Path(caches[site]).resolve())
            node = {NODE_SITE: site, NODE_STATE_DIR: state_dir, NODE_DATA_DIR: data_dir}
            cmd = supernode_argv(f"127.0.0.1:{port}", node, free_port())
            start(cmd, site, f"supernode-{site}.log")
        conn = Connection(f"127.0.0.1:{port}", insecure=True)
        run_id = submit_run(fed, run_dir, conn)
        log.info(
            "deployment: run %d on SuperLink :%d, %d sites",
            run_id,
            port,
            len(fed.sites),
        )
        left = max(1.0, timeout_s - (time.monotonic() - t0))
        try:
            status = follow_run(run_id, run_dir, timeout_s=left, poll_s=1.0)
        except ProcessError as exc:
            raise failure(str(exc)) from exc
        if status == FINISHED_DEGRADED:  # as in-process: some round aggregated
            log.warning("deployment: run %d ended degraded (outcome.json)", run_id)
        elif status != FINISHED_OK:
            raise failure(f"run {run_id} ended {status!r}")
        log.info("deployment: run %d finished in %.0f s", run_id, time.monotonic() - t0)
        return run_dir
    finally:
        # the SuperLink's, the SuperNodes' and the flwr CLI's (submit_run,
        # follow_run): a SIGTERM between a CLI child's fork and its Popen
        # returning leaves a process no ``with`` block waits for
        for home in [*homes, run_dir / FLWR_HOME_DIR]:
            kill_home_processes(home)
