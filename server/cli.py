"""``mammofed-server``: what the coordinator runs (certs, start, run, status...)."""

from __future__ import annotations

from collections.abc import Sequence

from common.cli import main_for

MODULES = (
    "server.commands.certs",
    "server.commands.node_key",
    "server.commands.signing_key",
    "server.commands.sign_app",
    "server.commands.start",
    "server.commands.register_node",
    "server.commands.unregister_node",
    "server.commands.run",
    "server.commands.status",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mammofed-server``."""
    return main_for("mammofed-server", __doc__ or "", MODULES, argv)


if __name__ == "__main__":
    raise SystemExit(main())
