"""TLS certificates, SuperNode auth keys, flag validation, and one TLS+auth run."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.commands.start import supernode_command
from common.errors import ConfigError
from common.flower_cli import flower_env
from common.wire.tls import (
    TlsError,
    check_node_private_key,
    check_superlink_auth_flags,
    client_tls_from_flags,
    generate_certificates,
    generate_node_key,
    server_tls_from_flags,
)
from server.cli import main as server_main
from server.launch import Connection, follow_run, register_supernodes, submit_run
from server.process import (
    ProcessError,
    TlsFiles,
    free_port,
    start_process,
    superlink_command,
    wait_for_port,
)
from tests.conftest import loopback_config


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    generate_certificates(out, ["localhost", "127.0.0.1", "superlink.example.org"])
    return out


# --- certificates ----------------------------------------------------------------


def test_server_cert_verifies_against_ca_with_sans(certs: Path) -> None:
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not signed by the CA
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {
        "localhost",
        "superlink.example.org",
    }
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1")
    ]
    for name in ("ca.key", "server.key"):
        assert _mode(certs / name) == 0o600, name
    for pub in ("ca.crt", "server.pem"):
        assert _mode(certs / pub) == 0o644, pub  # public: readable by services
    key = serialization.load_pem_private_key((certs / "server.key").read_bytes(), None)
    assert key.public_key() == server.public_key()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_handshake_with_python_ssl(certs: Path, host: str) -> None:
    """A client trusting only ca.crt accepts the server cert for each SAN."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.sendall(s.recv(4))
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    with client_ctx.wrap_socket(b, server_hostname=host) as c:
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
    t.join(10)
    assert not errors


def test_handshake_refused_for_other_host(certs: Path) -> None:
    client_ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    a, b = socket.socketpair()

    def serve() -> None:
        try:
            server_ctx.wrap_socket(a, server_side=True).close()
        except (ssl.SSLError, OSError):
            pass  # the client hung up: expected

    t = threading.Thread(target=serve)
    t.start()
    with pytest.raises(ssl.SSLCertVerificationError):
        client_ctx.wrap_socket(b, server_hostname="evil.example.org")
    b.close()
    t.join(10)
    a.close()


def test_certificates_refuse_overwrite_and_bad_args(tmp_path: Path) -> None:
    generate_certificates(tmp_path, ["localhost"], days=2)
    with pytest.raises(TlsError, match="exists"):
        generate_certificates(tmp_path, ["localhost"])
    generate_certificates(tmp_path, ["localhost"], overwrite=True)
    assert _mode(tmp_path / "server.key") == 0o600
    with pytest.raises(ConfigError, match="--days"):
        generate_certificates(tmp_path / "x", ["localhost"], days=0)
    with pytest.raises(ConfigError, match="--hosts"):
        generate_certificates(tmp_path / "y", [])


def test_node_key_is_what_flower_reads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    keys = generate_node_key(tmp_path, "site-a")
    assert keys.private_key.name == "site-a.key" and keys.public_key.name.endswith(
        ".pub"
    )
    assert _mode(keys.private_key) == 0o600
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    public = serialization.load_ssh_public_key(keys.public_key.read_bytes())
    assert public == private.public_key()
    assert try_load_public_key(keys.public_key)  # what `flwr supernode register` does
    with pytest.raises(TlsError, match="exists"):
        generate_node_key(tmp_path, "site-a")
    with pytest.raises(ConfigError, match="--site-name"):
        generate_node_key(tmp_path, "../x")


def test_cli_certs_and_node_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pki"
    argv = ["certs", "--out", str(out), "--hosts", "link.example.org", "--sites", "a,b"]
    assert server_main(argv) == 0
    printed = capsys.readouterr().out
    assert "--tls-dir" in printed and "ca.crt" in printed
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["link.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1")
    ]
    assert {p.name for p in out.iterdir()} == {
        "ca.crt",
        "ca.key",
        "server.pem",
        "server.key",
        "a.key",
        "a.pub",
        "b.key",
        "b.pub",
    }
    assert server_main(["node-key", "--out", str(tmp_path), "--site-name", "c"]) == 0
    assert _mode(tmp_path / "c.key") == 0o600
    assert server_main(["certs", "--out", str(out)]) == 2  # exists, no --overwrite


# --- flag validation ---------------------------------------------------------------


def _server_tls(
    *,
    insecure: bool = False,
    tls_dir: Path | None = None,
    ca_certfile: Path | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
) -> TlsFiles | None:
    return server_tls_from_flags(
        insecure=insecure,
        tls_dir=tls_dir,
        ca_certfile=ca_certfile,
        certfile=certfile,
        keyfile=keyfile,
    )


def test_server_tls_flags_accepted(certs: Path) -> None:
    assert _server_tls(insecure=True) is None
    from_dir = _server_tls(tls_dir=certs)
    assert from_dir == TlsFiles(
        certs / "ca.crt", certs / "server.pem", certs / "server.key"
    )
    explicit = _server_tls(
        ca_certfile=certs / "ca.crt",
        certfile=certs / "server.pem",
        keyfile=certs / "server.key",
    )
    assert explicit == from_dir


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({}, "--insecure/--tls-dir"),
        ({"insecure": True, "tls_dir": "DIR"}, "--insecure"),
        ({"insecure": True, "certfile": "server.pem"}, "--insecure"),
        ({"tls_dir": "DIR", "keyfile": "server.key"}, "--tls-dir"),
        ({"certfile": "server.pem", "keyfile": "server.key"}, "--ssl-ca-certfile"),
        ({"ca_certfile": "ca.crt"}, "--ssl-certfile"),
        ({"tls_dir": "missing-dir"}, "--tls-dir"),
        (
            {
                "ca_certfile": "ca.crt",
                "certfile": "nope.pem",
                "keyfile": "server.key",
            },
            "--ssl-certfile",
        ),
    ],
)
def test_server_tls_flags_refused(
    certs: Path, flags: dict[str, object], named: str
) -> None:
    resolved: dict[str, Any] = {
        k: (v if isinstance(v, bool) else certs / str(v).replace("DIR", ""))
        for k, v in flags.items()
    }
    with pytest.raises(ConfigError) as info:
        _server_tls(**resolved)
    assert f"command line: {named}:" in str(info.value)


def test_auth_flags(certs: Path, tmp_path: Path) -> None:
    tls = TlsFiles(certs / "ca.crt", certs / "server.pem", certs / "server.key")
    with pytest.raises(ConfigError, match="--enable-supernode-auth: needs TLS"):
        check_superlink_auth_flags(
            tls=None, enable_supernode_auth=True, register_keys=[]
        )
    keys = generate_node_key(tmp_path, "site-a")
    with pytest.raises(ConfigError, match="--register-keys: needs --enable"):
        check_superlink_auth_flags(
            tls=tls, enable_supernode_auth=False, register_keys=[tmp_path]
        )
    with pytest.raises(ConfigError, match="--register-keys: .* not an OpenSSH"):
        check_superlink_auth_flags(
            tls=tls, enable_supernode_auth=True, register_keys=[certs / "ca.crt"]
        )
    with pytest.raises(ConfigError, match="no \\*.pub"):
        check_superlink_auth_flags(
            tls=tls, enable_supernode_auth=True, register_keys=[certs]
        )
    assert check_superlink_auth_flags(
        tls=tls, enable_supernode_auth=True, register_keys=[tmp_path]
    ) == [keys.public_key]
    with pytest.raises(ProcessError, match="needs TLS"):
        superlink_command(insecure=True, enable_supernode_auth=True)
    cmd = superlink_command(tls=tls, enable_supernode_auth=True)
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(certs / "server.pem")


def test_client_tls_flags(certs: Path, tmp_path: Path) -> None:
    ca = certs / "ca.crt"
    keys = generate_node_key(tmp_path, "site-a")
    assert client_tls_from_flags(insecure=True, root_certificates=None) is None
    assert (
        client_tls_from_flags(
            insecure=False, root_certificates=ca, auth_key=keys.private_key
        )
        == ca.resolve()
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({"insecure": True, "root_certificates": ca}, "--insecure"),
        ({"insecure": False, "root_certificates": None}, "--root-certificates"),
        ({"insecure": False, "root_certificates": tmp_path / "x"}, "--root-cert"),
        (
            {"insecure": True, "root_certificates": None, "auth_key": keys.private_key},
            "--auth-key: needs TLS",
        ),
        (
            {"insecure": False, "root_certificates": ca, "auth_key": keys.public_key},
            "--auth-key: .* not an unencrypted OpenSSH",
        ),
        (
            {"insecure": False, "root_certificates": ca, "auth_key": certs / "ca.key"},
            "--auth-key",
        ),
    ]
    for kwargs, named in cases:
        with pytest.raises(ConfigError, match=named):
            client_tls_from_flags(**kwargs)


def test_private_keys_open_to_every_user_are_refused(tmp_path: Path) -> None:
    """A key any user of the host may read (or swap) is refused where it is used;
    a group may read one (install.md: node.key root:mammofed 0640)."""
    from common.wire.app_signing import (
        AppSigningError,
        generate_signing_key,
        load_signing_key,
    )

    pki = tmp_path / "pki"
    certs = generate_certificates(pki, ["localhost"])
    node = generate_node_key(tmp_path, "site-a")
    signing = generate_signing_key(tmp_path / "sign")
    for path in (node.private_key, certs.server_key, signing.private_key):
        path.chmod(0o640)
    assert check_node_private_key(node.private_key) == node.private_key
    accepted = _server_tls(tls_dir=pki)
    assert accepted is not None and accepted.keyfile == certs.server_key
    load_signing_key(signing.private_key)
    for mode in (0o644, 0o602, 0o601):
        for path in (node.private_key, certs.server_key, signing.private_key):
            path.chmod(mode)
        with pytest.raises(ConfigError, match="--auth-key: .* open to every user"):
            check_node_private_key(node.private_key)
        with pytest.raises(ConfigError, match="--tls-dir: .* open to every user"):
            _server_tls(tls_dir=pki)
        with pytest.raises(ConfigError, match="--ssl-keyfile: .* open to every"):
            _server_tls(
                ca_certfile=certs.ca_cert,
                certfile=certs.server_cert,
                keyfile=certs.server_key,
            )
        with pytest.raises(AppSigningError, match=f"{mode:04o}.*chmod o-rwx"):
            load_signing_key(signing.private_key)


def test_supernode_command_with_tls_and_auth(certs: Path, tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("name: site-a\nstate_dir: state\n")
    keys = generate_node_key(tmp_path, "site-a")
    args = argparse.Namespace(
        site_config=site,
        superlink="127.0.0.1:8000",
        insecure=False,
        root_certificates=certs / "ca.crt",
        auth_key=keys.private_key,
        port=9094,
        flwr_home=None,
        allow_unsigned_apps=True,  # signed apps: test_control_plane.py
    )
    cmd = supernode_command(args)
    assert cmd[cmd.index("--root-certificates") + 1] == str(certs / "ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(keys.private_key)
    assert "--insecure" not in cmd
    with pytest.raises(ConfigError, match="--auth-key: needs TLS"):
        supernode_command(
            argparse.Namespace(
                **{**vars(args), "insecure": True, "root_certificates": None}
            )
        )


def test_cli_start_refuses_before_starting(
    certs: Path, capsys: pytest.CaptureFixture
) -> None:
    rc = server_main(["start", "--insecure", "--enable-supernode-auth"])
    assert rc == 2
    assert "--enable-supernode-auth: needs TLS" in capsys.readouterr().err
    assert server_main(["start", "--tls-dir", str(certs), "--insecure"]) == 2
    assert server_main(["status", "--superlink", "127.0.0.1:1"]) == 2
    assert "--root-certificates" in capsys.readouterr().err


# --- one real deployment on loopback -------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_tls_node_auth_run_and_unregistered_key_refused(
    tmp_path: Path, flower_procs: list[subprocess.Popen[bytes]]
) -> None:
    """SuperLink with TLS + --enable-supernode-auth, two registered SuperNodes.

    One round with the toy model must finish; a SuperNode with an unregistered
    key must exit without ever getting a node id.
    """
    cfg = loopback_config(tmp_path, num_rounds=1)

    pki = tmp_path / "pki"
    files = generate_certificates(pki, ["localhost", "127.0.0.1"])
    keys = {s: generate_node_key(pki / "nodes", s) for s in ("site-a", "site-b")}
    rogue = generate_node_key(tmp_path / "rogue", "rogue")

    port = free_port()
    address = f"127.0.0.1:{port}"
    conn = Connection(address, False, files.ca_cert)
    flower_procs.append(
        start_process(
            superlink_command(
                port=port,
                tls=TlsFiles(files.ca_cert, files.server_cert, files.server_key),
                enable_supernode_auth=True,
            ),
            log_path=tmp_path / "superlink.log",
            env=flower_env(tmp_path / "home-superlink"),
            cwd=tmp_path,
        )
    )
    registered = register_supernodes([k.public_key for k in keys.values()], conn)
    assert all(node_id for node_id in registered.values()), registered

    def supernode(site: str, key: Path) -> subprocess.Popen[bytes]:
        yaml = tmp_path / f"{site}.yaml"
        yaml.write_text(f"name: {site}\nstate_dir: {tmp_path / 'state' / site}\n")
        args = argparse.Namespace(
            site_config=yaml,
            superlink=address,
            insecure=False,
            root_certificates=files.ca_cert,
            auth_key=key,
            port=free_port(),
            flwr_home=None,
            allow_unsigned_apps=True,  # runs this checkout unsigned
        )
        proc = start_process(
            supernode_command(args),
            log_path=tmp_path / f"{site}.log",
            env=flower_env(tmp_path / f"home-{site}"),
            cwd=tmp_path,
        )
        flower_procs.append(proc)
        return proc

    intruder = supernode("rogue", rogue.private_key)
    nodes = {site: supernode(site, pair.private_key) for site, pair in keys.items()}
    # registering again is harmless (a restarted coordinator does this)
    assert register_supernodes([keys["site-a"].public_key], conn) == {
        keys["site-a"].public_key: None
    }

    run_dir = tmp_path / "run"
    run_id = submit_run(cfg, run_dir, conn)
    status = follow_run(run_id, run_dir, timeout_s=300, poll_s=1.0)
    assert status == "finished:completed", (tmp_path / "superlink.log").read_text()[
        -3000:
    ]

    deadline = time.monotonic() + 30
    while intruder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    rogue_log = (tmp_path / "rogue.log").read_text()
    assert intruder.poll() not in (None, 0), rogue_log[-2000:]
    assert "Failed to activate SuperNode" in rogue_log
    assert "SuperNode ID" not in rogue_log
    for site in keys:
        assert "SuperNode ID" in (tmp_path / f"{site}.log").read_text()
    assert wait_for_port("127.0.0.1", port, 1)  # SuperLink still serving

    # the coordinator removes site-b (a hospital leaving, a key compromised):
    # its SuperNode is refused from then on and exits; site-a stays
    gone = registered[keys["site-b"].public_key]
    ca = str(files.ca_cert)
    args = ["--superlink", address, "--root-certificates", ca]
    assert server_main(["unregister-node", str(gone), *args]) == 0
    deadline = time.monotonic() + 90
    while nodes["site-b"].poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    b_log = (tmp_path / "site-b.log").read_text()
    assert nodes["site-b"].poll() is not None, b_log[-2000:]
    assert nodes["site-a"].poll() is None
    assert server_main(["unregister-node", "987654321", *args]) == 1
