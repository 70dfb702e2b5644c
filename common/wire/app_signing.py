"""Coordinator app signing: who may run code at a hospital.

A hospital's SuperNode runs a Flower App Bundle (FAB: a zip of the app's
code) only when one of its *trusted entities* signed it (Flower's own
``flower-supernode --trusted-entities FILE`` check). Flower 1.42 verifies
exactly this: an Ed25519 signature over ``signed_at`` (8 bytes, big-endian
Unix seconds) followed by ``sha256(fab)``, stored base64url in the FAB's
verification record under the signer's key id. This module makes the
coordinator's key, the site's trusted-entities file, and the signatures in
that format; the SuperNode checks them.

Files (``mammofed-server signing-key --out DIR``):

- ``app-signing.key``: OpenSSH Ed25519 private key, mode 0600; the
  coordinator only (best kept off the SuperLink host between releases).
- ``app-signing.pub``: the public half.
- ``trusted-entities.yaml``: ``{<key id>: "ssh-ed25519 AAAA... <key id>"}``;
  copied to every hospital (``mammofed-client start --trusted-entities``).
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from common.config import load_yaml
from common.errors import ConfigError, MammofedError, shown
from common.fileio import refuse_existing, write_new_file
from common.wire.tls import shared_key_problem

SIGNING_KEY = "app-signing.key"
SIGNING_PUB = "app-signing.pub"
TRUSTED_ENTITIES = "trusted-entities.yaml"
KEY_ID_PREFIX = "mammofed-"


class AppSigningError(MammofedError):
    """A signing key, signature or trusted-entities file that cannot be used."""


@dataclass(frozen=True)
class SigningKeyFiles:
    """What :func:`generate_signing_key` wrote."""

    private_key: Path
    public_key: Path
    trusted_entities: Path
    key_id: str


@dataclass(frozen=True)
class FabSignature:
    """One verification record of a FAB, as Flower's SuperNode reads it.

    ``signature`` is base64url (no padding) of the Ed25519 signature over
    ``signed_at.to_bytes(8, "big") + sha256(fab).digest()``.
    """

    public_key_id: str
    signature: str
    signed_at: int

    def to_json(self) -> dict[str, str | int]:
        """The record as the app registry serves it (Flower Hub's field names)."""
        return asdict(self)

    @classmethod
    def from_json(cls, row: Mapping[str, object], source: str) -> FabSignature:
        """Parse :meth:`to_json`; raises :class:`ConfigError` naming the field."""
        for key, kind in (
            ("public_key_id", str),
            ("signature", str),
            ("signed_at", int),
        ):
            value = row.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(source, key, f"expected {kind.__name__}: {value!r}")
        signed_at = row["signed_at"]
        assert isinstance(signed_at, int)
        return cls(str(row["public_key_id"]), str(row["signature"]), signed_at)


def key_id_of(public_key: ed25519.Ed25519PublicKey) -> str:
    """Stable key id: ``mammofed-`` + first 16 hex of sha256(raw public key)."""
    raw = public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return KEY_ID_PREFIX + hashlib.sha256(raw).hexdigest()[:16]


def openssh_public(public_key: ed25519.Ed25519PublicKey, comment: str) -> str:
    """``ssh-ed25519 AAAA... comment`` (what ``--trusted-entities`` maps to)."""
    line = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")
    return f"{line} {comment}"


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> None:
    write_new_file(
        path, data, private=private, overwrite=overwrite, error=AppSigningError
    )


def generate_signing_key(out_dir: Path, *, overwrite: bool = False) -> SigningKeyFiles:
    """Write a new coordinator signing key and the hospitals' trusted-entities file.

    Raises :class:`AppSigningError` if a file exists and ``overwrite`` is false
    (nothing is written then).
    """
    out_dir = Path(out_dir)
    paths = [out_dir / n for n in (SIGNING_KEY, SIGNING_PUB, TRUSTED_ENTITIES)]
    if not overwrite:
        refuse_existing(paths, AppSigningError)
    key = ed25519.Ed25519PrivateKey.generate()
    key_id = key_id_of(key.public_key())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = openssh_public(key.public_key(), key_id)
    _write(paths[0], private, private=True, overwrite=overwrite)
    _write(paths[1], (public + "\n").encode(), private=False, overwrite=overwrite)
    write_trusted_entities(paths[2], {key_id: public}, overwrite=overwrite)
    return SigningKeyFiles(paths[0], paths[1], paths[2], key_id)


def write_trusted_entities(
    path: Path, entities: Mapping[str, str], *, overwrite: bool = False
) -> Path:
    """Write ``{key id: "ssh-ed25519 ..."}`` as YAML (validated first)."""
    text = yaml.safe_dump(dict(entities), default_flow_style=False, width=1000)
    _check_entities(dict(entities), str(path))
    _write(Path(path), text.encode(), private=False, overwrite=overwrite)
    return Path(path)


def _check_entities(raw: object, source: str) -> dict[str, ed25519.Ed25519PublicKey]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            source, "<root>", f"expected a non-empty mapping of key id to key: {raw!r}"
        )
    keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for key_id, value in raw.items():
        if not isinstance(key_id, str) or not isinstance(value, str):
            why = f"expected a string key: {shown(value)}"
            raise ConfigError(source, str(key_id), why)
        try:
            public = serialization.load_ssh_public_key(value.encode("utf-8"))
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(
                source, key_id, f"not an OpenSSH public key: {shown(value, 40)}"
            ) from exc
        if not isinstance(public, ed25519.Ed25519PublicKey):
            why = f"not an Ed25519 key (Flower needs one): {shown(value, 40)}"
            raise ConfigError(source, key_id, why)
        keys[key_id] = public
    return keys


def read_trusted_entities(path: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """Load and check a trusted-entities file the way ``flower-supernode`` does.

    Raises :class:`ConfigError` naming the file, the key id and the bad value
    (Flower itself only exits with a code).
    """
    return _check_entities(load_yaml(path), str(path))


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The coordinator's OpenSSH Ed25519 private key; raises naming the file.

    A key file every user of the host may access is refused
    (:func:`common.wire.tls.shared_key_problem`).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise AppSigningError(f"{path}: signing key does not exist") from exc
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AppSigningError(
            f"{path}: not an unencrypted OpenSSH private key ({exc})"
        ) from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise AppSigningError(
            f"{path}: not an Ed25519 key ({type(key).__name__}); "
            "make one with `mammofed-server signing-key`"
        )
    problem = shared_key_problem(path)
    if problem is not None:
        raise AppSigningError(problem)
    return key


def _message(fab: bytes, signed_at: int) -> bytes:
    return signed_at.to_bytes(8, byteorder="big") + hashlib.sha256(fab).digest()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


#: How far in the future a signature's ``signed_at`` may lie (clock skew
#: between the coordinator and a site) before the site refuses it.
MAX_CLOCK_SKEW_S = 24 * 3600


@dataclass(frozen=True)
class AppAgePolicy:
    """A site's limits on when the apps it runs were signed.

    Flower checks that a trusted key signed the FAB; it does not look at
    ``signed_at``, so an app signed once runs for ever, and an older release
    with a since-fixed flaw can be sent again (rolled back) by whoever
    controls the SuperLink. A site sets either limit in its config
    (``apps``): ``signed_after`` (Unix seconds) revokes every release
    signed before it; ``max_age_s`` makes signatures expire. A signature
    dated more than :data:`MAX_CLOCK_SKEW_S` ahead of the site's clock is
    refused too (it would outlive ``max_age_s``).
    """

    signed_after: int | None = None
    max_age_s: float | None = None

    @property
    def active(self) -> bool:
        """Whether any limit is set."""
        return self.signed_after is not None or self.max_age_s is not None

    def problem(self, signed_at: int, now: float) -> str | None:
        """Why a signature of ``signed_at`` is refused at ``now``, or ``None``."""
        if signed_at > now + MAX_CLOCK_SKEW_S:
            return f"signed_at {signed_at} is in the future (site clock {int(now)})"
        if self.signed_after is not None and signed_at < self.signed_after:
            return (
                f"signed_at {signed_at} is before this site's apps.signed_after "
                f"{self.signed_after}"
            )
        if self.max_age_s is not None and now - signed_at > self.max_age_s:
            days = (now - signed_at) / 86400
            return (
                f"signed {days:.1f} days ago, older than this site's "
                f"apps.max_age_days {self.max_age_s / 86400:g}"
            )
        return None


def check_fab_signature(
    fab: bytes,
    verifications: Mapping[str, str],
    trusted: Mapping[str, str],
    policy: AppAgePolicy,
    *,
    now: float | None = None,
) -> str | None:
    """``None`` when a trusted key signed ``fab`` within ``policy``; else why not.

    ``verifications`` is the FAB's record as Flower's SuperNode holds it
    (key id -> JSON ``{"signature", "signed_at"}``; ``valid_license`` is
    not a signature); ``trusted`` the site's trusted entities (key id ->
    ``ssh-ed25519 ...``). The signature is verified here too, so a record
    whose date was edited fails; every malformed record is skipped.
    """
    import json

    when = time.time() if now is None else now
    reasons: list[str] = []
    for key_id, raw in verifications.items():
        if key_id == "valid_license" or key_id not in trusted:
            continue
        try:
            record = json.loads(raw)
            signed_at = record["signed_at"]
            signature = _b64url_decode(str(record["signature"]))
            if not isinstance(signed_at, int) or isinstance(signed_at, bool):
                raise TypeError(f"signed_at {shown(signed_at)}")
            public = serialization.load_ssh_public_key(trusted[key_id].encode())
            if not isinstance(public, ed25519.Ed25519PublicKey):
                raise TypeError("not an Ed25519 key")
            public.verify(signature, _message(fab, signed_at))
        except (
            ValueError,  # JSON, base64, the key
            TypeError,
            KeyError,
            InvalidSignature,
            UnsupportedAlgorithm,
        ) as exc:  # a hostile record is never a reason to run
            reasons.append(f"{key_id}: not a valid signature ({shown(exc, 80)})")
            continue
        why = policy.problem(signed_at, when)
        if why is None:
            return None
        reasons.append(f"{key_id}: {why}")
    return "; ".join(reasons) or "no signature by a trusted key"


def sign_fab(
    fab: bytes, key: ed25519.Ed25519PrivateKey, *, signed_at: int | None = None
) -> FabSignature:
    """Sign the FAB bytes (see :class:`FabSignature` for what is signed)."""
    when = int(time.time()) if signed_at is None else int(signed_at)
    signature = key.sign(_message(fab, when))
    return FabSignature(key_id_of(key.public_key()), _b64url(signature), when)
