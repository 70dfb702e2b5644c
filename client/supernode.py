"""The ``flower-supernode`` command line a hospital runs (``mammofed-client start``)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from common.flower_cli import flower_bin
from common.wire.app_signing import AppAgePolicy


def supernode_argv(
    superlink: str,
    node_config: Mapping[str, str],
    port: int,
    *,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    trusted_entities: Path | None = None,
    app_policy: AppAgePolicy | None = None,
) -> list[str]:
    """``flower-supernode`` command line: dial ``superlink`` and play ``node_config``.

    ``node_config`` values are written as JSON strings (quotes and spaces in
    paths survive); ``port`` is the SuperNode's local ClientApp runtime port.
    Without ``root_certificates`` the connection is ``--insecure``;
    ``auth_key`` (an OpenSSH EC private key registered with the SuperLink)
    signs the node's requests and needs TLS. ``trusted_entities`` (YAML of
    Ed25519 keys, ``common.wire.app_signing``): the node runs only apps signed by
    one of them (Flower refuses any other FAB before running its code).
    ``app_policy`` with a limit set (the site config's ``apps``) needs
    ``trusted_entities`` and runs the SuperNode through
    :mod:`client.supernode_main`, which also refuses a FAB whose every
    trusted signature is dated outside the limits.

    Raises:
        ValueError: ``auth_key`` without ``root_certificates``, or an active
            ``app_policy`` without ``trusted_entities``.
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
    if app_policy is None or not app_policy.active:
        return cmd
    if trusted_entities is None:
        raise ValueError("limits on when apps were signed need trusted entities")
    limits = [sys.executable, "-m", "client.supernode_main"]
    if app_policy.signed_after is not None:
        limits += ["--apps-signed-after", str(app_policy.signed_after)]
    if app_policy.max_age_s is not None:
        limits += ["--apps-max-age-s", repr(float(app_policy.max_age_s))]
    return [*limits, "--", *cmd[1:]]
