"""``mammofed-server run``: launch a federated run on the SuperLink and follow it."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "run"
HELP = "launch a federated run (flwr run) on the SuperLink and follow its rounds"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``run``."""
    parser.add_argument(
        "--federation", type=Path, required=True, help="federation YAML"
    )
    parser.add_argument("--superlink", default="127.0.0.1:8000", help="host:port")
    parser.add_argument("--insecure", action="store_true", help="no TLS (tests only)")
    parser.add_argument("--root-certificates", type=Path, help="CA of the SuperLink")
    parser.add_argument(
        "--run-dir", type=Path, help="run folder (default: the YAML's run_dir)"
    )
    parser.add_argument(
        "--app",
        help="signed app @publisher/name==x.y.z (`sign-app`; hospitals with "
        "--trusted-entities refuse the unsigned default: this checkout)",
    )
    parser.add_argument(
        "--initial-checkpoint",
        type=Path,
        help="detector checkpoint that starts the run (checked against the "
        "YAML's trainer.options; overrides the YAML's initial_checkpoint)",
    )
    parser.add_argument("--no-follow", action="store_true", help="submit and return")
    parser.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds")


def run(args: argparse.Namespace) -> int:
    """Submit the run; follow it unless ``--no-follow``; 0 when it completed."""
    from common.detector.model.initial import (
        checkpoint_shared_arrays,
        with_initial_checkpoint,
    )
    from common.wire.federation import load_federation_config
    from common.wire.tls import client_tls_from_flags
    from server.launch import Connection, follow_run, submit_run

    cfg = load_federation_config(args.federation)
    if args.initial_checkpoint is not None:
        cfg = with_initial_checkpoint(cfg, args.initial_checkpoint)
    if cfg.initial_checkpoint is not None:  # refuse a wrong file before submitting
        checkpoint_shared_arrays(cfg.initial_checkpoint, cfg)
    run_dir = (args.run_dir or cfg.run_dir or Path("runs") / cfg.name).resolve()
    ca = client_tls_from_flags(
        insecure=args.insecure, root_certificates=args.root_certificates
    )
    conn = Connection(args.superlink, args.insecure, ca)
    run_id = submit_run(cfg, run_dir, conn, app=args.app)
    print(f"run {run_id} started; run dir {run_dir}")
    if args.no_follow:
        return 0
    status = follow_run(run_id, run_dir, timeout_s=args.timeout)
    print(f"run {run_id}: {status}")
    return 0 if status.endswith("completed") else 1
