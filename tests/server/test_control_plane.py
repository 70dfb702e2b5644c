"""Only the coordinator controls the federation (issue 16, item 1).

One SuperLink (TLS, node auth) listens on 127.0.0.1 only; the Fleet gateway
stands for the public address; one hospital SuperNode trusts only the
coordinator's app-signing key. A small probe app (its ClientApp writes a
marker file, so "ran at the hospital" is observable) is run:

- by an outsider holding only ``ca.crt``, against the public address:
  ``flwr supernode register`` and ``flwr run`` fail;
- by the coordinator, signed: runs on the node;
- by the coordinator, unsigned (``flwr run <dir>``) or signed by another
  key: refused by the hospital's SuperNode before any of its code runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from flwr.cli.build import build_fab_from_disk

from client.supernode import supernode_argv
from common.errors import ConfigError
from common.flower_cli import flower_bin, flower_env
from common.wire.app_signing import (
    AppAgePolicy,
    AppSigningError,
    FabSignature,
    generate_signing_key,
    load_signing_key,
    read_trusted_entities,
    sign_fab,
)
from common.wire.tls import generate_certificates, generate_node_key
from server.app_registry import (
    AppRegistry,
    fab_identity,
    load_signed_app,
    sign_app,
    write_signed_app,
)
from server.fleet_gateway import FleetGateway, GatewayConfig
from server.launch import Connection, find_json, prepare_home
from server.process import (
    ProcessError,
    free_port,
    start_process,
    superlink_command,
)
from tests.conftest import assert_groups_gone

# --- a probe app: its ClientApp leaves a marker file where it ran ---------------

PROBE_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "probe"
version = "{version}"
dependencies = []

[tool.flwr.app]
publisher = "{publisher}"

[tool.flwr.app.components]
serverapp = "probe_app.server:app"
clientapp = "probe_app.client:app"

[tool.flwr.app.config]
marker-dir = ""
"""

PROBE_SERVER = '''\
"""Send one query to every node; write each reply's error code (0 = ran)."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["marker-dir"]))
    deadline = time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    msgs = [
        Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=n,
                message_type="query")
        for n in nodes
    ]
    replies = grid.send_and_receive(msgs, timeout=90)
    codes = {
        str(r.metadata.src_node_id): (r.error.code if r.has_error() else 0)
        for r in replies
    }
    (out / f"server-{context.run_id}.json").write_text(json.dumps(codes))
'''

PROBE_CLIENT = '''\
"""Prove that this code ran on the node: write a marker file."""

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    out = Path(str(context.run_config["marker-dir"]))
    (out / f"ran-{context.run_id}-{context.node_id}").write_text("payload ran")
    return Message(RecordDict({"a": ConfigRecord({"ok": 1})}), reply_to=msg)
'''


def write_probe_app(
    root: Path, *, publisher: str = "coordinator", version: str = "1.0.0"
) -> Path:
    """A Flower app directory (pyproject + ServerApp + ClientApp)."""
    pkg = root / "probe_app"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "server.py").write_text(PROBE_SERVER)
    (pkg / "client.py").write_text(PROBE_CLIENT)
    (root / "pyproject.toml").write_text(
        PROBE_PYPROJECT.format(publisher=publisher, version=version)
    )
    return root


# --- unit tests: signing, trusted entities, registry, gateway routing -------------


def flower_verifies(
    content: bytes, signatures: list[FabSignature], trusted_entities: Path
) -> bool:
    """Whether Flower's SuperNode accepts ``content`` with ``signatures``."""
    from flwr.supercore.fab import Fab
    from flwr.supernode.start_client_internal import _verify_fab

    record = {
        s.public_key_id: json.dumps(
            {"signature": s.signature, "signed_at": s.signed_at}
        )
        for s in signatures
    }
    record["valid_license"] = "Valid"
    trusted = yaml.safe_load(trusted_entities.read_text())
    return _verify_fab(Fab("h", content, record), trusted)


def test_signature_is_what_flower_supernode_verifies(tmp_path: Path) -> None:
    keys = generate_signing_key(tmp_path / "pki")
    assert (keys.private_key.stat().st_mode & 0o777) == 0o600
    assert list(yaml.safe_load(keys.trusted_entities.read_text())) == [keys.key_id]
    fab = build_fab_from_disk(write_probe_app(tmp_path / "app"))
    key = load_signing_key(keys.private_key)
    sig = sign_fab(fab, key)
    assert flower_verifies(fab, [sig], keys.trusted_entities)
    # another key, even under the trusted key id, or other bytes: refused
    other = generate_signing_key(tmp_path / "other")
    forged = sign_fab(fab, load_signing_key(other.private_key))
    forged_same_id = FabSignature(keys.key_id, forged.signature, forged.signed_at)
    for bad_sig, content in (
        (forged, fab),
        (forged_same_id, fab),
        (sig, fab + b"x"),
        (FabSignature(keys.key_id, sig.signature, sig.signed_at + 1), fab),
    ):
        assert not flower_verifies(content, [bad_sig], keys.trusted_entities)


def test_signing_key_and_trusted_entities_refusals(tmp_path: Path) -> None:
    keys = generate_signing_key(tmp_path)
    with pytest.raises(AppSigningError, match="exists"):
        generate_signing_key(tmp_path)
    node = generate_node_key(tmp_path / "n", "site-a")  # ECDSA: not a signing key
    with pytest.raises(AppSigningError, match="not an Ed25519"):
        load_signing_key(node.private_key)
    with pytest.raises(AppSigningError, match="does not exist"):
        load_signing_key(tmp_path / "nope.key")
    bad = tmp_path / "bad.yaml"
    cases = {
        "[]\n": "<root>",
        "k: 42\n": "k",
        "k: not a key\n": "k",
        f"k: '{node.public_key.read_text().strip()}'\n": "k",  # ECDSA, not Ed25519
    }
    for text, key in cases.items():
        bad.write_text(text)
        with pytest.raises(ConfigError, match=f"{bad}: {key}"):
            read_trusted_entities(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        read_trusted_entities(tmp_path / "absent.yaml")
    assert keys.key_id in read_trusted_entities(keys.trusted_entities)


def test_supernode_argv_passes_trusted_entities(tmp_path: Path) -> None:
    keys = generate_signing_key(tmp_path)
    cmd = supernode_argv(
        "h:1", {}, 9094, trusted_entities=keys.trusted_entities.resolve()
    )
    assert cmd[cmd.index("--trusted-entities") + 1] == str(
        keys.trusted_entities.resolve()
    )
    assert "--trusted-entities" not in supernode_argv("h:1", {}, 9094)


def test_registry_serves_only_stored_versions(tmp_path: Path) -> None:
    keys = generate_signing_key(tmp_path / "pki")
    apps = tmp_path / "apps"
    signed = sign_app(write_probe_app(tmp_path / "app"), keys.private_key, apps)
    assert signed.spec == "@coordinator/probe==1.0.0"
    assert load_signed_app(signed.record_path) == signed
    with AppRegistry(apps) as registry:
        ok = httpx.post(
            f"{registry.url}/hub/fetch-fab",
            json={"app_id": signed.app_id, "app_version": "1.0.0"},
        )
        assert ok.status_code == 200
        body = ok.json()
        assert body["verifications"] == [signed.verifications[0].to_json()]
        assert httpx.get(body["fab_url"]).content == signed.fab_path.read_bytes()
        for version in ("2.0.0", None):
            missing = httpx.post(
                f"{registry.url}/hub/fetch-fab",
                json={"app_id": signed.app_id, "app_version": version},
            )
            assert missing.status_code == 404
        assert httpx.get(f"{registry.url}/fabs/{'0' * 64}.fab").status_code == 404
        # a FAB changed after signing is not served under its record
        signed.fab_path.write_bytes(signed.fab_path.read_bytes() + b"x")
        assert (
            httpx.post(
                f"{registry.url}/hub/fetch-fab",
                json={"app_id": signed.app_id, "app_version": "1.0.0"},
            ).status_code
            == 404
        )
    with pytest.raises(ConfigError, match="fab_sha256"):
        load_signed_app(signed.record_path)
    with pytest.raises(ConfigError, match="--signed-apps"):
        AppRegistry(tmp_path / "no-such-dir")


def test_gateway_forwards_fleet_only(tmp_path: Path) -> None:
    """Against a stand-in upstream that records what reached it."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    seen: list[tuple[str, bytes, str | None]] = []

    class Upstream(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.path, body, self.headers.get("X-Flwr-Sig")))
            self.send_response(201)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"pong")

    up = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    Thread(target=up.serve_forever, daemon=True).start()
    port = free_port()
    try:
        with FleetGateway(GatewayConfig("127.0.0.1", port, up.server_port, None)):
            base = f"http://127.0.0.1:{port}"
            reply = httpx.post(
                f"{base}/v1/fleet/pull-messages",
                content=b"ping",
                headers={"X-Flwr-Sig": "s1"},
            )
            assert (reply.status_code, reply.content) == (201, b"pong")
            for method, path in (
                ("POST", "/v1/control/start-run"),
                ("POST", "/v1/control/create-node-cli"),
                ("POST", "/v1/runtime/pull-messages"),
                ("POST", "/v1/fleet/../control/start-run"),
                ("POST", "/v1/fleet/%2e%2e/control/start-run"),
                ("POST", "/v1/fleet/a/b"),
                ("GET", "/v1/fleet/pull-messages"),
                ("GET", "/docs"),
            ):
                refused = httpx.request(method, base + path, content=b"x")
                assert refused.status_code == 404, (method, path)
    finally:
        up.shutdown()
        up.server_close()
    assert seen == [("/v1/fleet/pull-messages", b"ping", "s1")]
    with pytest.raises(ProcessError, match="ports"):
        GatewayConfig("127.0.0.1", 0, 1, None)


def test_superlink_command_refuses_public_host() -> None:
    with pytest.raises(ProcessError, match="loopback"):
        superlink_command(host="0.0.0.0", insecure=True)
    cmd = superlink_command(host="127.0.0.1", insecure=True)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


@pytest.mark.parametrize(
    ("superlink", "allowed"),
    [
        ("127.0.0.1:9092", True),
        ("localhost:9092", True),
        ("[::1]:9092", True),
        ("coordinator.example.org:9092", False),
        ("10.0.0.5:9092", False),
        ("[2001:db8::1]:9092", False),
    ],
)
def test_client_start_insecure_only_to_a_loopback_superlink(
    tmp_path: Path, superlink: str, allowed: bool
) -> None:
    """--insecure would send a site's updates in the clear and let any machine
    on the path pose as the SuperLink: refused unless the SuperLink is local."""
    from client.commands.start import supernode_command

    site = tmp_path / "site.yaml"
    site.write_text("name: site-a\nstate_dir: state\n")
    args = argparse.Namespace(
        site_config=site,
        superlink=superlink,
        insecure=True,
        root_certificates=None,
        auth_key=None,
        port=9094,
        flwr_home=None,
        trusted_entities=None,
        allow_unsigned_apps=False,
    )
    if allowed:
        assert "--insecure" in supernode_command(args)
    else:
        with pytest.raises(ConfigError, match="--insecure: only to a SuperLink on"):
            supernode_command(args)


def test_client_start_requires_trusted_entities_with_tls(tmp_path: Path) -> None:
    from client.commands.start import supernode_command

    pki = generate_certificates(tmp_path / "pki", ["localhost"])
    keys = generate_signing_key(tmp_path / "pki")
    site = tmp_path / "site.yaml"
    site.write_text("name: site-a\nstate_dir: state\n")
    base = {
        "site_config": site,
        "superlink": "coordinator.example.org:9092",
        "insecure": False,
        "root_certificates": pki.ca_cert,
        "auth_key": None,
        "port": 9094,
        "flwr_home": None,
        "trusted_entities": None,
        "allow_unsigned_apps": False,
    }
    with pytest.raises(ConfigError, match="--trusted-entities: required with TLS"):
        supernode_command(argparse.Namespace(**base))
    cmd = supernode_command(
        argparse.Namespace(**{**base, "trusted_entities": keys.trusted_entities})
    )
    assert cmd[cmd.index("--trusted-entities") + 1] == str(
        keys.trusted_entities.resolve()
    )
    unsigned = supernode_command(
        argparse.Namespace(**{**base, "allow_unsigned_apps": True})
    )
    assert "--trusted-entities" not in unsigned
    with pytest.raises(ConfigError, match="--allow-unsigned-apps: cannot"):
        supernode_command(
            argparse.Namespace(
                **{
                    **base,
                    "trusted_entities": keys.trusted_entities,
                    "allow_unsigned_apps": True,
                }
            )
        )
    broken = tmp_path / "te.yaml"
    broken.write_text("k: ssh-rsa AAAA\n")
    with pytest.raises(ConfigError, match=f"{broken}: k"):
        supernode_command(argparse.Namespace(**{**base, "trusted_entities": broken}))


def test_cli_start_refuses_public_control_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main as server_main

    assert server_main(["start", "--insecure", "--host", "0.0.0.0"]) == 2
    assert "loopback only" in capsys.readouterr().err
    assert server_main(["start", "--insecure", "--fleet-host", "0.0.0.0"]) == 2
    assert "--fleet-host: 0.0.0.0: a public Fleet gateway needs TLS" in (
        capsys.readouterr().err
    )


def test_cli_start_refuses_public_gateway_without_node_auth(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without node auth the SuperLink lets any caller register a node: a public
    gateway would hand every round's global model to anyone holding ca.crt.
    Nothing is started here (gateway and SuperLink are stand-ins)."""
    import contextlib

    import server.fleet_gateway
    import server.process
    from server.cli import main as server_main

    started: list[str] = []

    def gateway(cfg: GatewayConfig) -> contextlib.AbstractContextManager[None]:
        started.append(f"gateway {cfg.host}")
        return contextlib.nullcontext()

    def superlink(cmd: list[str], **_: object) -> int:
        started.append("superlink")
        return 0

    monkeypatch.setattr(server.fleet_gateway, "FleetGateway", gateway)
    monkeypatch.setattr(server.process, "run_foreground", superlink)
    generate_certificates(tmp_path / "pki", ["localhost", "127.0.0.1"])
    start = ["start", "--tls-dir", str(tmp_path / "pki"), "--fleet-host"]
    assert server_main([*start, "0.0.0.0"]) == 2
    assert "--fleet-host: 0.0.0.0: a public Fleet gateway needs " in (
        capsys.readouterr().err
    )
    assert started == []
    # loopback (tests, an SSH tunnel) and public with node auth are accepted
    assert server_main([*start, "127.0.0.1"]) == 0
    assert server_main([*start, "0.0.0.0", "--enable-supernode-auth"]) == 0
    assert started == ["gateway 127.0.0.1", "superlink", "gateway 0.0.0.0", "superlink"]


def test_cli_signing_key_and_sign_app(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main as server_main

    pki = tmp_path / "pki"
    assert server_main(["signing-key", "--out", str(pki)]) == 0
    assert "--trusted-entities" in capsys.readouterr().out
    assert server_main(["signing-key", "--out", str(pki)]) == 2  # exists
    app = write_probe_app(tmp_path / "app")
    apps = tmp_path / "apps"
    argv = ["sign-app", "--key", str(pki / "app-signing.key"), "--apps-dir", str(apps)]
    assert server_main([*argv, "--app-dir", str(app)]) == 0
    assert "--app @coordinator/probe==1.0.0" in capsys.readouterr().out
    (record,) = apps.glob("*.json")
    signed = load_signed_app(record)
    content = signed.fab_path.read_bytes()
    trusted = pki / "trusted-entities.yaml"
    assert flower_verifies(content, list(signed.verifications), trusted)
    assert server_main([*argv, "--app-dir", str(tmp_path / "empty")]) == 2


# --- real processes on loopback ----------------------------------------------------


@dataclass
class Federation:
    """One coordinator and one hospital, shared by the integration cases."""

    tmp: Path
    ca: Path
    control: Connection  # the coordinator's own view (127.0.0.1, Control API)
    public: str  # host:port SuperNodes and outsiders can reach
    apps: Path
    signing_key: Path
    markers: Path
    hospital_log: Path


def _flwr(args: list[str], home: Path, timeout_s: float = 90) -> tuple[int, str]:
    res = subprocess.run(
        [flower_bin("flwr"), *args],
        env=flower_env(home),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return res.returncode, res.stdout + res.stderr


def _wait_for(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    return path.exists()


def _started_run_id(out: str) -> int:
    payload = find_json(out)
    assert payload is not None and payload.get("success"), out[-2000:]
    return int(payload["run-id"])


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Federation]:
    """``mammofed-server start`` (SuperLink on 127.0.0.1 with TLS and node auth,
    Fleet gateway, signed-app registry) and one hospital SuperNode that trusts
    only the coordinator's key. Every process is stopped at teardown, also when
    a test failed.
    """
    from server.process import stop_process

    tmp = tmp_path_factory.mktemp("control-plane")
    pki = generate_certificates(tmp / "pki", ["localhost", "127.0.0.1"])
    signing = generate_signing_key(tmp / "pki")
    node = generate_node_key(tmp / "pki" / "nodes", "hospital")
    apps = tmp / "apps"
    apps.mkdir()
    markers = tmp / "markers"
    markers.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port, public_port = free_port(), free_port()
        coordinator_log = tmp / "coordinator.log"
        procs.append(
            start_process(
                [
                    flower_bin("mammofed-server"),
                    "start",
                    "--port",
                    str(port),
                    "--tls-dir",
                    str(tmp / "pki"),
                    "--enable-supernode-auth",
                    "--register-keys",
                    str(node.public_key),
                    "--fleet-host",
                    "127.0.0.1",  # stands for the public interface
                    "--fleet-port",
                    str(public_port),
                    "--signed-apps",
                    str(apps),
                ],
                log_path=coordinator_log,
                env=flower_env(tmp / "home-superlink"),
                cwd=tmp,
            )
        )
        assert _wait_for_text(coordinator_log, "registered hospital.pub", 90), (
            coordinator_log.read_text()
        )
        public = f"127.0.0.1:{public_port}"
        hospital_log = tmp / "hospital.log"
        procs.append(
            start_process(
                supernode_argv(
                    public,
                    {},
                    free_port(),
                    root_certificates=pki.ca_cert.resolve(),
                    auth_key=node.private_key.resolve(),
                    trusted_entities=signing.trusted_entities.resolve(),
                    # the site's apps limits: releases signed over a day ago
                    # are refused (client.supernode_main wraps Flower's check)
                    app_policy=AppAgePolicy(signed_after=int(time.time()) - 86400),
                ),
                log_path=hospital_log,
                env=flower_env(tmp / "home-hospital"),
                cwd=tmp,
            )
        )
        assert _wait_for_text(hospital_log, "SuperNode ID", 60), (
            hospital_log.read_text()
        )
        yield Federation(
            tmp,
            pki.ca_cert,
            Connection(f"127.0.0.1:{port}", False, pki.ca_cert),
            public,
            apps,
            signing.private_key,
            markers,
            hospital_log,
        )
    finally:
        for proc in procs:
            stop_process(proc)
        assert_groups_gone([proc.pid for proc in procs])


def _wait_for_text(path: Path, text: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="ignore"):
            return True
        time.sleep(0.5)
    return False


def _run(fed: Federation, app: str, home: Path) -> int:
    code, out = _flwr(
        [
            "run",
            app,
            "mammofed",
            "--run-config",
            f'marker-dir="{fed.markers}"',
            "--format",
            "json",
        ],
        home,
    )
    assert code == 0, out[-2000:]
    return _started_run_id(out)


def _server_codes(fed: Federation, run_id: int) -> dict[str, int]:
    path = fed.markers / f"server-{run_id}.json"
    assert _wait_for(path, 150), (fed.tmp / "coordinator.log").read_text()[-3000:]
    return {k: int(v) for k, v in json.loads(path.read_text()).items()}


def _ran_at_hospital(fed: Federation, run_id: int) -> bool:
    return any(fed.markers.glob(f"ran-{run_id}-*"))


@pytest.mark.integration
@pytest.mark.slow
def test_outsider_cannot_register_or_run(federation: Federation) -> None:
    """Only ``ca.crt`` and the public address: both Control calls fail."""
    fed = federation
    outsider = fed.tmp / "outsider"
    home = prepare_home(outsider, Connection(fed.public, False, fed.ca))
    key = generate_node_key(outsider / "keys", "intruder")
    code, out = _flwr(
        ["supernode", "register", str(key.public_key), "mammofed", "--format", "json"],
        home,
    )
    assert '"success": false' in out and "only the Fleet API" in out, out
    app = write_probe_app(outsider / "app", publisher="outsider")
    code, out = _flwr(
        ["run", str(app), "mammofed", "--run-config", f'marker-dir="{fed.markers}"'],
        home,
    )
    assert code != 0 and "only the Fleet API" in out, out
    assert not list(fed.markers.glob("ran-*")), "outsider code ran"
    # the coordinator's Control API did not see either call
    rc, listing = _flwr(
        ["supernode", "list", "mammofed", "--format", "json"],
        prepare_home(fed.tmp / "coord-list", fed.control),
    )
    assert rc == 0 and "intruder" not in listing, listing


@pytest.mark.integration
@pytest.mark.slow
def test_signed_app_runs_unsigned_and_resigned_are_refused(
    federation: Federation,
) -> None:
    fed = federation
    home = prepare_home(fed.tmp / "coordinator", fed.control)

    # signed by the coordinator: runs on the hospital node
    signed = sign_app(write_probe_app(fed.tmp / "signed"), fed.signing_key, fed.apps)
    run_id = _run(fed, signed.spec, home)
    assert list(_server_codes(fed, run_id).values()) == [0]
    assert _ran_at_hospital(fed, run_id)

    # unsigned (the landed `flwr run <dir>` path): refused before it runs
    unsigned = write_probe_app(fed.tmp / "unsigned", version="1.0.1")
    run_id = _run(fed, str(unsigned), home)
    assert list(_server_codes(fed, run_id).values()) == [7]  # ErrorCode.INVALID_FAB
    assert not _ran_at_hospital(fed, run_id)

    # signed by another key (also under the coordinator's key id): refused
    other = generate_signing_key(fed.tmp / "other-key")
    fab = build_fab_from_disk(write_probe_app(fed.tmp / "resigned", version="1.0.2"))
    forged = sign_fab(fab, load_signing_key(other.private_key))
    trusted_id = next(
        iter(read_trusted_entities(fed.tmp / "pki" / "trusted-entities.yaml"))
    )
    resigned = write_signed_app(
        fed.apps,
        fab,
        [forged, FabSignature(trusted_id, forged.signature, forged.signed_at)],
    )
    assert fab_identity(fab) == (resigned.app_id, "1.0.2")
    run_id = _run(fed, resigned.spec, home)
    assert list(_server_codes(fed, run_id).values()) == [7]
    assert not _ran_at_hospital(fed, run_id)

    # signed by the coordinator's key, but two days ago, before the site's
    # apps.signed_after: a rolled-back release is refused, its code never run
    old_fab = build_fab_from_disk(write_probe_app(fed.tmp / "old", version="1.0.3"))
    stale = sign_fab(
        old_fab, load_signing_key(fed.signing_key), signed_at=int(time.time()) - 172800
    )
    rolled_back = write_signed_app(fed.apps, old_fab, [stale])
    run_id = _run(fed, rolled_back.spec, home)
    assert list(_server_codes(fed, run_id).values()) == [7]
    assert not _ran_at_hospital(fed, run_id)
    log = fed.hospital_log.read_text()
    assert "FAB verification failed" in log
    assert "App verification is not supported" in log  # the unsigned one
    assert "refused by this site's apps limits" in log and "signed_after" in log
