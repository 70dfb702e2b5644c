"""TLS certificates and SuperNode authentication keys for a real deployment.

What Flower 1.42 needs, and what this module makes:

* **TLS** (one listener serves the Fleet, Control and Runtime APIs): the SuperLink
  takes ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile
  server.key``; SuperNodes and the ``flwr`` CLI take the CA (``ca.crt``) as their
  root certificate. :func:`generate_certificates` writes a self-signed CA and a
  server certificate signed by it whose subject alternative names are the hosts
  the SuperLink is reached by (``127.0.0.1`` must be one of them for loopback).
* **SuperNode authentication**: the SuperLink runs with
  ``--enable-supernode-auth`` (which Flower refuses without TLS); each SuperNode
  signs its requests with an EC private key in OpenSSH format
  (``flower-supernode --auth-supernode-private-key``); the coordinator registers
  each node's OpenSSH public key on the SuperLink (``flwr supernode register``,
  see :func:`server.launch.register_supernode`). A SuperNode whose key is not
  registered cannot activate. :func:`generate_node_key` writes such a pair
  (NIST P-384, as the Flower docs use).

Private keys are created with mode 0600 and never overwritten unless asked;
one that any user of the host may read or write (mode ``o+rwx`` bits) is
refused where it is used (:func:`shared_key_problem`).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError, MammofedError
from common.fileio import refuse_existing, write_new_file

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
NODE_PRIVATE_SUFFIX = ".key"
NODE_PUBLIC_SUFFIX = ".pub"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
#: What the coordinator's own ``flwr`` calls dial (``start --register-keys``).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 365
COMMAND_LINE = "command line"
#: Mode bits that let every user of the host use a private key (a group may
#: read one: docs/install.md gives node.key root:mammofed 0640).
OTHERS_ACCESS = 0o007


class TlsError(MammofedError):
    """Certificates or keys could not be written or read."""


@dataclass(frozen=True)
class TlsFiles:
    """Server TLS files for the SuperLink (all three or none)."""

    ca_certfile: Path
    certfile: Path
    keyfile: Path


@dataclass(frozen=True)
class CertFiles:
    """What :func:`generate_certificates` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeyFiles:
    """A SuperNode's authentication key pair (OpenSSH format)."""

    private_key: Path
    public_key: Path


def parse_hosts(text: str) -> list[str]:
    """Comma-separated host names / IP addresses; empty items dropped.

    Raises :class:`ConfigError` when nothing is left.
    """
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    if not hosts:
        raise ConfigError(COMMAND_LINE, "--hosts", "give at least one host or IP")
    return hosts


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> None:
    write_new_file(path, data, private=private, overwrite=overwrite, error=TlsError)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    start: datetime.datetime,
    end: datetime.datetime,
    *,
    ca: bool,
) -> x509.CertificateBuilder:
    """Subject, issuer, key, validity, basic constraints and key usage.

    A CA signs certificates (path length 0); a server certificate does key
    agreement. Both sign (ECDSA).
    """
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True
        )
        .add_extension(usage, critical=True)
    )


def generate_certificates(
    out_dir: Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    days: int = DEFAULT_DAYS,
    overwrite: bool = False,
) -> CertFiles:
    """Write a self-signed CA and a SuperLink certificate signed by it.

    Files in ``out_dir``: ``ca.crt`` (give to every SuperNode and ``flwr`` user),
    ``ca.key`` (keep offline; only needed to sign a new server certificate),
    ``server.pem`` and ``server.key`` (SuperLink only). The server certificate's
    SANs are ``hosts`` (IP addresses as IP SANs, the rest as DNS names), its
    common name the first host. Keys are EC P-384, mode 0600. Raises
    :class:`TlsError` if a file exists and ``overwrite`` is false, and
    :class:`ConfigError` for ``days < 1`` or no hosts.
    """
    if days < 1:
        raise ConfigError(COMMAND_LINE, "--days", f"must be >= 1, got {days}")
    if not hosts:
        raise ConfigError(COMMAND_LINE, "--hosts", "give at least one host or IP")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = CertFiles(
        out_dir / CA_CERT, out_dir / CA_KEY, out_dir / SERVER_CERT, out_dir / SERVER_KEY
    )
    if not overwrite:
        refuse_existing(dataclasses.astuple(files), TlsError)

    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(minutes=5)  # tolerate small clock skew
    end = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mammofed CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        _cert_builder(ca_name, ca_name, ca_key, start, end, ca=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0]))])
    server_cert = (
        _cert_builder(server_name, ca_name, server_key, start, end, ca=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(_san(hosts), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    pem = serialization.Encoding.PEM
    for path, data, private in (
        (files.ca_key, _pem_key(ca_key), True),
        (files.server_key, _pem_key(server_key), True),
        (files.ca_cert, ca_cert.public_bytes(pem), False),
        (files.server_cert, server_cert.public_bytes(pem), False),
    ):
        _write(path, data, private=private, overwrite=overwrite)
    return files


def node_key_files(out_dir: Path, site: str) -> NodeKeyFiles:
    """Where the key pair of ``site`` lives in ``out_dir``."""
    if not site or "/" in site or site.startswith("."):
        raise ConfigError(
            COMMAND_LINE, "--site-name", f"not a usable file name: {site!r}"
        )
    return NodeKeyFiles(
        out_dir / f"{site}{NODE_PRIVATE_SUFFIX}",
        out_dir / f"{site}{NODE_PUBLIC_SUFFIX}",
    )


def generate_node_key(
    out_dir: Path, site: str, *, overwrite: bool = False
) -> NodeKeyFiles:
    """Write ``<site>.key`` (0600) and ``<site>.pub``: a SuperNode auth key pair.

    EC P-384 in OpenSSH format, what ``flower-supernode
    --auth-supernode-private-key`` and ``flwr supernode register`` read. The
    private key stays at the hospital; only the ``.pub`` goes to the
    coordinator.
    """
    files = node_key_files(out_dir, site)
    if not overwrite:
        refuse_existing(dataclasses.astuple(files), TlsError)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = (
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" mammofed-{site}\n".encode()
    )
    _write(files.private_key, private, private=True, overwrite=overwrite)
    _write(files.public_key, public, private=False, overwrite=overwrite)
    return files


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host(address: str) -> str:
    """The host of ``host:port`` (``[::1]:9092`` -> ``::1``; no port: all of it)."""
    if address.startswith("["):
        return address[1 : address.find("]")] if "]" in address else address
    host, sep, port = address.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else address


def shared_key_problem(path: Path) -> str | None:
    """Why private key ``path`` must not be used (any user may access it), or None.

    Only the mode is checked (``path`` must exist): ``chmod o-rwx`` fixes it.
    """
    mode = stat.S_IMODE(Path(path).stat().st_mode)
    if mode & OTHERS_ACCESS:
        return (
            f"{path} is a private key open to every user of this host (mode "
            f"{mode:04o}); restrict it: chmod o-rwx {path}"
        )
    return None


def _private_key_file(path: Path, flag: str) -> Path:
    """``path`` (existing) unless every user of the host may access it."""
    path = _existing(path, flag)
    problem = shared_key_problem(path)
    if problem is not None:
        raise ConfigError(COMMAND_LINE, flag, problem)
    return path


def _check_key_file(
    path: Path,
    flag: str,
    load: Callable[[bytes], object],
    kind: type,
    names: tuple[str, str],
) -> Path:
    """``path`` if ``load`` reads a ``kind`` key from it; ``names``: (format, kind)."""
    path = _existing(path, flag)
    try:
        key = load(path.read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            COMMAND_LINE, flag, f"{path} is not {names[0]}: {exc}"
        ) from exc
    if not isinstance(key, kind):
        raise ConfigError(COMMAND_LINE, flag, f"{path} is not {names[1]}")
    return path


def check_node_private_key(path: Path, flag: str = "--auth-key") -> Path:
    """``path`` if it holds an unencrypted OpenSSH EC private key.

    Flower exits with a bare "Unable to parse the private key file." otherwise;
    this names the flag and the file instead. A key every user of the host may
    access is refused (:func:`shared_key_problem`).
    """
    _check_key_file(
        path,
        flag,
        lambda data: serialization.load_ssh_private_key(data, None),
        ec.EllipticCurvePrivateKey,
        ("an unencrypted OpenSSH key", "an EC key"),
    )
    return _private_key_file(path, flag)


def check_node_public_key(path: Path, flag: str = "--register-keys") -> Path:
    """``path`` if it holds an OpenSSH EC public key (what Flower registers)."""
    return _check_key_file(
        path,
        flag,
        serialization.load_ssh_public_key,
        ec.EllipticCurvePublicKey,
        ("an OpenSSH public key", "an EC public key"),
    )


def public_keys_in(paths: Sequence[Path], flag: str = "--register-keys") -> list[Path]:
    """Each file in ``paths``, or each ``*.pub`` of a directory, checked; sorted."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            pubs = sorted(p.glob(f"*{NODE_PUBLIC_SUFFIX}"))
            if not pubs:
                raise ConfigError(COMMAND_LINE, flag, f"no *.pub file in {p}")
            found += pubs
        else:
            found.append(p)
    return [check_node_public_key(p, flag) for p in found]


def _existing(path: Path, flag: str) -> Path:
    if not Path(path).is_file():
        raise ConfigError(COMMAND_LINE, flag, f"file does not exist: {path}")
    return Path(path)


def server_tls_from_flags(
    *,
    insecure: bool,
    tls_dir: Path | None,
    ca_certfile: Path | None,
    certfile: Path | None,
    keyfile: Path | None,
) -> TlsFiles | None:
    """The SuperLink's TLS files from ``start``'s flags (``None`` = insecure).

    Exactly one of ``--insecure``, ``--tls-dir`` (holding ``ca.crt``,
    ``server.pem``, ``server.key``) or all three ``--ssl-*`` files; every file
    must exist, and the private key must not be open to every user of the
    host. Raises :class:`ConfigError` naming the offending flag.
    """
    explicit = {
        "--ssl-ca-certfile": ca_certfile,
        "--ssl-certfile": certfile,
        "--ssl-keyfile": keyfile,
    }
    given = [flag for flag, v in explicit.items() if v is not None]
    if insecure and (tls_dir is not None or given):
        other = "--tls-dir" if tls_dir is not None else given[0]
        raise ConfigError(
            COMMAND_LINE, "--insecure", f"cannot be combined with {other}"
        )
    if tls_dir is not None and given:
        raise ConfigError(
            COMMAND_LINE, "--tls-dir", f"cannot be combined with {given[0]}"
        )
    if insecure:
        return None
    if tls_dir is not None:
        d = Path(tls_dir)
        if not d.is_dir():
            raise ConfigError(COMMAND_LINE, "--tls-dir", f"not a directory: {d}")
        return TlsFiles(
            _existing(d / CA_CERT, "--tls-dir"),
            _existing(d / SERVER_CERT, "--tls-dir"),
            _private_key_file(d / SERVER_KEY, "--tls-dir"),
        )
    if not given:
        raise ConfigError(
            COMMAND_LINE,
            "--insecure/--tls-dir",
            "give --tls-dir DIR (see `mammofed-server certs`), the three --ssl-* "
            "files, or --insecure (loopback tests only)",
        )
    missing = [flag for flag, v in explicit.items() if v is None]
    if missing:
        raise ConfigError(
            COMMAND_LINE, missing[0], f"is required together with {given[0]}"
        )
    assert ca_certfile is not None and certfile is not None and keyfile is not None
    return TlsFiles(
        _existing(ca_certfile, "--ssl-ca-certfile"),
        _existing(certfile, "--ssl-certfile"),
        _private_key_file(keyfile, "--ssl-keyfile"),
    )


def check_superlink_auth_flags(
    *,
    tls: TlsFiles | None,
    enable_supernode_auth: bool,
    register_keys: Sequence[Path],
) -> list[Path]:
    """Validate ``start``'s auth flags; returns the public keys to register.

    ``--enable-supernode-auth`` needs TLS (Flower exits otherwise);
    ``--register-keys`` needs ``--enable-supernode-auth`` (without it nodes
    register themselves and a pre-registered key would only collide).
    """
    if enable_supernode_auth and tls is None:
        raise ConfigError(
            COMMAND_LINE,
            "--enable-supernode-auth",
            "needs TLS (--tls-dir or the --ssl-* files), not --insecure",
        )
    if register_keys and not enable_supernode_auth:
        raise ConfigError(
            COMMAND_LINE, "--register-keys", "needs --enable-supernode-auth"
        )
    return public_keys_in(register_keys) if register_keys else []


def client_tls_from_flags(
    *,
    insecure: bool,
    root_certificates: Path | None,
    auth_key: Path | None = None,
) -> Path | None:
    """The CA a SuperNode / ``flwr`` client trusts (``None`` = insecure).

    Exactly one of ``--insecure`` or ``--root-certificates`` (an existing file);
    ``--auth-key`` (checked to be an OpenSSH EC private key) needs TLS, since a
    SuperLink with node authentication always runs with TLS.
    """
    if insecure and root_certificates is not None:
        raise ConfigError(
            COMMAND_LINE, "--insecure", "cannot be combined with --root-certificates"
        )
    if not insecure and root_certificates is None:
        raise ConfigError(
            COMMAND_LINE,
            "--root-certificates",
            "give the SuperLink's CA (ca.crt), or --insecure (loopback tests only)",
        )
    if auth_key is not None:
        if insecure:
            raise ConfigError(
                COMMAND_LINE,
                "--auth-key",
                "needs TLS (--root-certificates); a SuperLink with node "
                "authentication never runs --insecure",
            )
        check_node_private_key(auth_key, "--auth-key")
    if root_certificates is None:
        return None
    return _existing(root_certificates, "--root-certificates").resolve()
