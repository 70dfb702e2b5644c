"""``mammofed-sim``: the researcher's one-machine harness."""

from __future__ import annotations

from collections.abc import Sequence

from common.cli import main_for

MODULES = (
    "simulation.commands.phantom",
    "simulation.commands.import_mias",
    "simulation.commands.train",
    "simulation.commands.crossval",
    "simulation.commands.run",
    "simulation.commands.report",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mammofed-sim``."""
    return main_for("mammofed-sim", __doc__ or "", MODULES, argv)


if __name__ == "__main__":
    raise SystemExit(main())
