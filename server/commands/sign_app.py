"""``mammofed-server sign-app``: build this app's FAB and sign it for the hospitals."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import folder_arg
from common.errors import ConfigError, one_line

NAME = "sign-app"
HELP = "build the Flower app bundle (FAB), sign it, store it for `start --signed-apps`"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sign-app``."""
    parser.add_argument(
        "--key", type=Path, required=True, help="app-signing.key (signing-key)"
    )
    parser.add_argument(
        "--apps-dir",
        type=folder_arg,
        required=True,
        help="where signed FABs live (mammofed-server start --signed-apps)",
    )
    parser.add_argument(
        "--app-dir",
        type=Path,
        help="the Flower app to build (default: this installation)",
    )


def check_key_path(path: Path, flag: str = "--key") -> Path:
    """``path`` unless it is a directory or cannot be opened for reading.

    A missing file, or one that is no signing key, is left to
    :func:`common.wire.app_signing.load_signing_key` (which names it); a
    directory or an unreadable file would otherwise end in a traceback.
    Raises :class:`ConfigError` naming ``flag`` and the path.
    """
    from common.wire.tls import COMMAND_LINE

    if path.is_dir():
        raise ConfigError(COMMAND_LINE, flag, f"{path} is a directory")
    if path.exists():
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ConfigError(
                COMMAND_LINE, flag, f"{path} is not readable ({one_line(exc)})"
            ) from None
    return path


def run(args: argparse.Namespace) -> int:
    """Sign and say how to run it."""
    from server.app_registry import sign_app
    from server.launch import APP_DIR

    check_key_path(args.key)
    signed = sign_app(args.app_dir or APP_DIR, args.key, args.apps_dir)
    print(f"signed {signed.spec}: {signed.fab_path} (sha256 {signed.fab_sha256})")
    print(f"run it with: mammofed-server run --app {signed.spec} ...")
    return 0
