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


#: Environment switches with which a SuperLink also opens Flower's legacy gRPC
#: Control and Fleet servers, on every interface (flwr 1.42,
#: ``flwr.superlink.cli.flower_superlink``): never passed to Flower.
LEGACY_LISTENERS = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for Flower child processes.

    Puts this interpreter's ``bin`` first on ``PATH`` (the SuperLink and
    SuperNode launch ``flower-superexec``/``flwr-serverapp`` by name) and sets
    ``FLWR_HOME`` when given, so runs share no hidden state in ``~/.flwr``.
    Flower's switches for its legacy gRPC listeners (:data:`LEGACY_LISTENERS`,
    which open the Control and Fleet APIs on every interface, beside the
    loopback SuperLink and the gateway) are removed from the environment.
    """
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k not in LEGACY_LISTENERS}
    env["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), env.get("PATH", "")]
    )
    env["PYTHONUNBUFFERED"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env
