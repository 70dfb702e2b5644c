"""The Flower ``ServerApp`` (``serverapp = "server.app:app"``).

Reads the typed :class:`common.wire.federation.FederationConfig` from
``context.run_config`` (``federation-json`` or ``federation-config``, plus
``run-dir``) and hands over to :func:`server.federation.run_federation`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.wire.federation import federation_config_from_run_config
from server.federation import run_federation

log = logging.getLogger(__name__)

#: The folder holding ``configs/`` (the repo root, or the installed FAB).
APP_ROOT = Path(__file__).resolve().parents[1]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: config from run_config, then the run loop."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO)
    logging.getLogger("server").setLevel(logging.INFO)
    cfg = federation_config_from_run_config(context.run_config, APP_ROOT)
    run_dir = cfg.run_dir or Path.cwd() / "runs" / cfg.name
    log.info("federation %s: run dir %s", cfg.name, run_dir)
    run_federation(grid, cfg, run_dir)
