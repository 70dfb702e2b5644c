"""``mammofed-server status``: runs on the SuperLink and a run dir's progress.

An unreachable SuperLink is an error (exit 2, one line naming the address),
never an empty list.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

NAME = "status"
HELP = "list the SuperLink's runs; with --run-dir, that run's last round"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``status``."""
    parser.add_argument("--superlink", default="127.0.0.1:8000", help="host:port")
    parser.add_argument("--insecure", action="store_true", help="no TLS (tests only)")
    parser.add_argument("--root-certificates", type=Path, help="CA of the SuperLink")
    parser.add_argument("--run-dir", type=Path, help="show this run's progress")


def _brief(value: Any, limit: int = 2000) -> str:
    """``value`` as printed (a string as is), shortened when over ``limit`` chars.

    A row of ``rounds.jsonl`` is read from disk: a value edited to be huge is
    quoted in part (:func:`common.errors.shown`), never in full.
    """
    from common.errors import shown

    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else shown(value, limit)


def run(args: argparse.Namespace) -> int:
    """Print one line per run, then the run dir's last round if asked."""
    from common.wire.runfolder import (
        CHECKPOINT_DIR,
        ROUNDS_JSONL,
        RunFolderError,
        complete_rounds,
        last_round_row,
    )
    from common.wire.tls import client_tls_from_flags
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
        if not args.run_dir.is_dir():
            raise RunFolderError(f"{args.run_dir}: run folder does not exist")
        # read only: a mistyped --run-dir must not create folders
        ckpt_dir = args.run_dir / CHECKPOINT_DIR
        rounds = complete_rounds(ckpt_dir) if ckpt_dir.is_dir() else []
        print(f"{args.run_dir}: checkpoints for rounds {rounds}")
        last = last_round_row(args.run_dir / ROUNDS_JSONL)
        if last is not None:
            print(
                f"last round {last['round']} {_brief(last.get('status'))}: "
                f"train {_brief(last.get('train_aggregated'))} "
                f"eval {_brief(last.get('evaluate_aggregated'))}"
            )
        outcome = read_outcome(args.run_dir)
        if outcome is not None:
            print(
                f"outcome {_brief(outcome['status'])}: rounds without an aggregated "
                f"update {_brief(outcome['rounds_without_update'])}, rounds with "
                f"faults {_brief(sorted(outcome['faults'], key=int))}"
            )
    return 0
