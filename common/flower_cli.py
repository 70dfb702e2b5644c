"""Where Flower's command-line programs are, and the environment they run in.

Both sides start Flower processes (the coordinator ``flower-superlink`` and
``flwr``, a hospital ``flower-supernode``); what they launch lives on their
side (``server/process.py``, ``client/supernode.py``), these two helpers here.
"""

from __future__ import annotations

from pathlib import Path


def flower_bin(name: str) -> str:
    """Path of a Flower CLI (``flower-superlink``, ``flwr``...) beside this Python.

    Falls back to the bare name (resolved on ``PATH``).
    """
    import shutil
    import sys

    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    return shutil.which(name) or name


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for Flower child processes.

    Puts this interpreter's ``bin`` first on ``PATH`` (the SuperLink and
    SuperNode launch ``flower-superexec``/``flwr-serverapp`` by name) and sets
    ``FLWR_HOME`` when given, so runs share no hidden state in ``~/.flwr``.
    """
    import os
    import sys

    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), env.get("PATH", "")]
    )
    env["PYTHONUNBUFFERED"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env
