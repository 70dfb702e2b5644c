"""``mammofed-server status``: runs on the SuperLink and a run dir's progress.

An unreachable SuperLink is an error (exit 2, one line naming the address),
never an empty list.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

NAME = "status"
HELP = "list the SuperLink's runs; with --run-dir, that run's last round"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``status``."""
    parser.add_argument("--superlink", default="127.0.0.1:8000", help="host:port")
    parser.add_argument("--insecure", action="store_true", help="no TLS (tests only)")
    parser.add_argument("--root-certificates", type=Path, help="CA of the SuperLink")
    parser.add_argument("--run-dir", type=Path, help="show this run's progress")


def run(args: argparse.Namespace) -> int:
    """Print one line per run, then the run dir's last round if asked."""
    from common.fileio import read_jsonl
    from common.wire.runfolder import CHECKPOINT_DIR, ROUNDS_JSONL
    from common.wire.tls import client_tls_from_flags
    from server.checkpoints import CheckpointStore
    from server.faults import read_outcome
    from server.launch import Connection, list_runs, prepare_home
    from server.process import ProcessError

    ca = client_tls_from_flags(
        insecure=args.insecure, root_certificates=args.root_certificates
    )
    conn = Connection(args.superlink, args.insecure, ca)
    with tempfile.TemporaryDirectory(prefix="mammofed-status-") as tmp:
        home = prepare_home(Path(tmp), conn)
        try:
            runs = list_runs(home)
        except ProcessError as exc:
            raise ProcessError(
                f"SuperLink at {conn.address} is unreachable or refused: {exc}"
            ) from exc
        if not runs:
            print(f"SuperLink at {conn.address}: no runs")
        for r in runs:
            print(f"run {r.get('run-id')}: {r.get('status')} ({r.get('elapsed')})")
    if args.run_dir is not None:
        store = CheckpointStore(args.run_dir / CHECKPOINT_DIR)
        rounds = store.rounds()
        print(f"{args.run_dir}: checkpoints for rounds {rounds}")
        rows = read_jsonl(args.run_dir / ROUNDS_JSONL)
        if rows:
            last = rows[-1]
            print(
                f"last round {last['round']} {last['status']}: "
                f"train {last['train_aggregated']} eval {last['evaluate_aggregated']}"
            )
        outcome = read_outcome(args.run_dir)
        if outcome is not None:
            print(
                f"outcome {outcome['status']}: rounds without an aggregated update "
                f"{outcome['rounds_without_update']}, rounds with faults "
                f"{sorted(outcome['faults'], key=int)}"
            )
    return 0
