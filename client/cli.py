"""``mammofed-client``: what a hospital runs.

Subcommands: the modules of :data:`MODULES` (ingest, start, export, predict...).
"""

from __future__ import annotations

from collections.abc import Sequence

from common.cli import main_for

MODULES = (
    "client.commands.ingest",
    "client.commands.start",
    "client.commands.status",
    "client.commands.export",
    "client.commands.export_onnx",
    "client.commands.train_local",
    "client.commands.evaluate",
    "client.commands.predict",
    "client.commands.serve",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mammofed-client``."""
    return main_for("mammofed-client", __doc__ or "", MODULES, argv)


if __name__ == "__main__":
    raise SystemExit(main())
