"""The ``flower-supernode`` command line a hospital runs (``mammofed-client start``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from common.flower_cli import flower_bin


def supernode_argv(
    superlink: str,
    node_config: Mapping[str, str],
    port: int,
    *,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    trusted_entities: Path | None = None,
) -> list[str]:
    """``flower-supernode`` command line: dial ``superlink`` and play ``node_config``.

    ``node_config`` values are written as JSON strings (quotes and spaces in
    paths survive); ``port`` is the SuperNode's local ClientApp runtime port.
    Without ``root_certificates`` the connection is ``--insecure``;
    ``auth_key`` (an OpenSSH EC private key registered with the SuperLink)
    signs the node's requests and needs TLS. ``trusted_entities`` (YAML of
    Ed25519 keys, ``common.wire.app_signing``): the node runs only apps signed by
    one of them (Flower refuses any other FAB before running its code).

    Raises:
        ValueError: ``auth_key`` without ``root_certificates``.
    """
    import json

    if auth_key is not None and root_certificates is None:
        raise ValueError("a SuperNode auth key needs TLS (root certificates)")
    config = " ".join(f"{k}={json.dumps(str(v))}" for k, v in node_config.items())
    cmd = [
        flower_bin("flower-supernode"),
        "--superlink",
        superlink,
        "--node-config",
        config,
        "--port",
        str(port),
    ]
    if root_certificates is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    if trusted_entities is not None:
        cmd += ["--trusted-entities", str(trusted_entities)]
    return cmd
