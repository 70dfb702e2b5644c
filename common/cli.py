"""Shared machinery for the three thin command-line entry points.

Each subcommand is a module exposing::

    NAME: str                      # the subcommand word
    HELP: str                      # one line for --help
    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int   # exit status

An entry point lists candidate modules; only modules that exist are offered, so a
subcommand appears when it is implemented, never as a stub. Every module is
imported to build the parser, so it imports heavy code (torch, flwr) only inside
``run``: ``--help`` takes well under a second. Library errors
(:class:`common.errors.MammofedError`) become a one-line message and exit code 2.
SIGTERM is turned into :class:`Terminated` while a subcommand runs, so its
``finally`` blocks (stopping a SuperLink, SuperNodes, Ray) run as on Ctrl-C;
the exit code is then 143.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from types import FrameType

from common.errors import MammofedError

log = logging.getLogger("mammofed")

#: Exit code of a command stopped by SIGTERM (128 + 15, as a shell reports it).
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived; raised where the program was, so cleanups run.

    A :class:`BaseException` (like :class:`KeyboardInterrupt`) so that
    ``except Exception`` handlers do not swallow it.
    """


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread.

    Outside the main thread (where Python cannot set handlers) it does nothing.
    The previous handler is restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: Distributions whose versions ``--version`` prints (this package first).
VERSIONED_PACKAGES = ("mammofed", "torch", "flwr")


def package_version(name: str) -> str:
    """Installed version of distribution ``name`` (``absent`` if not installed).

    Read from the distribution's metadata: nothing heavy (torch) is imported.
    """
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def version_string(prog: str) -> str:
    """``PROG 0.1.0 (torch 2.x, flwr 1.42.0)``; an absent package reads ``absent``."""
    own, *deps = VERSIONED_PACKAGES
    rest = ", ".join(f"{name} {package_version(name)}" for name in deps)
    return f"{prog} {package_version(own)} ({rest})"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless X is None, False or []."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def folder_arg(value: str) -> Path:
    """The argparse ``type`` of an output folder: refused when a file is there.

    ``makedirs`` would fail later with a bare ``FileExistsError``.
    """
    p = Path(value)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a file, not a folder")
    return p


def fraction_arg(value: str) -> float:
    """The argparse ``type`` of a share in [0, 1)."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= x < 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{value!r} is not in [0, 1)")
    return x


def count_arg(value: str) -> int:
    """The argparse ``type`` of a count that may be 0 (bootstrap draws, workers)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is negative")
    return n


def add_set_argument(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    """Add ``--set KEY=VALUE`` (repeatable) into ``args.settings``.

    For :func:`common.config.apply_settings`: one setting of ``what`` changed
    for this run without a copy of the file.
    """
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"change one setting of {what} (repeatable; VALUE read as YAML), "
        f"e.g. --set {example}; validated like the file and recorded in the "
        "run's resolved config",
    )


def build_parser(
    prog: str, description: str, modules: Sequence[str]
) -> argparse.ArgumentParser:
    """Parser with one subparser per existing subcommand module, and ``--version``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--version",
        action="version",
        version=version_string(prog),
        help="print the package, torch and flwr versions and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        if importlib.util.find_spec(name) is None:
            continue
        mod = importlib.import_module(name)
        p = sub.add_parser(
            mod.NAME, help=mod.HELP, description=mod.HELP, formatter_class=HelpFormatter
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def setup_logging(verbose: bool = False) -> None:
    """One-line log format on stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main_for(
    prog: str,
    description: str,
    modules: Sequence[str],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, run the chosen subcommand and map errors to exit codes."""
    parser = build_parser(prog, description, modules)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        with sigterm_raises():
            return int(args._run(args))
    except MammofedError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
