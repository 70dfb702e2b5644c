"""Signed apps on the coordinator, and the loopback registry the SuperLink reads.

Flower 1.42 hands a SuperNode verification records for a FAB only when the
SuperLink fetched that FAB from an app hub (``flwr run @publisher/app==x.y.z``;
a FAB uploaded by ``flwr run <dir>`` always arrives unverified, and a SuperNode
with ``--trusted-entities`` refuses it). The SuperLink asks the hub at
``$FLWR_SUPERGRID_API_URL/hub/fetch-fab``; this module is that hub for one
coordinator: it serves, on 127.0.0.1 only, the FABs that ``mammofed-server
sign-app`` built and signed, with their signatures in Flower Hub's record
format. It never signs anything itself and vouches for nothing: each hospital's
SuperNode checks the signature against its own trusted-entities file.

Layout of the apps directory (one pair per app version)::

    <publisher>.<name>-<x.y.z>.fab        the FAB bytes, exactly as signed
    <publisher>.<name>-<x.y.z>.json       {"app_id", "app_version", "fab_sha256",
                                           "verifications": [FabSignature...]}
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.wire.app_signing import (
    AppSigningError,
    FabSignature,
    load_signing_key,
    sign_fab,
)

log = logging.getLogger(__name__)

#: Environment variable the SuperLink reads for the app hub's base URL.
HUB_URL_ENV = "FLWR_SUPERGRID_API_URL"
FETCH_PATH = "/v1/hub/fetch-fab"
FAB_PATH = "/v1/fabs/"
REGISTRY_HOST = "127.0.0.1"
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class SignedApp:
    """One app version in the apps directory.

    ``app_id`` is ``@publisher/name`` (what ``flwr run`` takes before ``==``).
    """

    app_id: str
    app_version: str
    fab_path: Path
    record_path: Path
    fab_sha256: str
    verifications: tuple[FabSignature, ...]

    @property
    def spec(self) -> str:
        """``@publisher/name==x.y.z``: the app argument of ``flwr run``."""
        return f"{self.app_id}=={self.app_version}"


def fab_identity(fab: bytes) -> tuple[str, str]:
    """``("@publisher/name", "x.y.z")`` read from the FAB's pyproject.toml."""
    from flwr.common.config import get_fab_config, get_metadata_from_config

    try:
        fab_id, version = get_metadata_from_config(get_fab_config(fab))
    except (KeyError, ValueError, OSError) as exc:
        raise AppSigningError(f"not a Flower App Bundle: {exc}") from exc
    if not _VERSION.match(version):
        raise AppSigningError(
            f"app version {version!r} is not x.y.z (Flower's app-spec rule)"
        )
    return f"@{fab_id}", version


def _stem(app_id: str, version: str) -> str:
    return f"{app_id.lstrip('@').replace('/', '.')}-{version}"


def write_signed_app(
    apps_dir: Path, fab: bytes, signatures: Sequence[FabSignature]
) -> SignedApp:
    """Store ``fab`` with its signature records (replacing that app version)."""
    app_id, version = fab_identity(fab)
    apps_dir = Path(apps_dir)
    apps_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(app_id, version)
    fab_path, record_path = apps_dir / f"{stem}.fab", apps_dir / f"{stem}.json"
    sha = hashlib.sha256(fab).hexdigest()
    fab_path.write_bytes(fab)
    record = {
        "app_id": app_id,
        "app_version": version,
        "fab_sha256": sha,
        "verifications": [s.to_json() for s in signatures],
    }
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return SignedApp(app_id, version, fab_path, record_path, sha, tuple(signatures))


def sign_app(app_dir: Path, key_path: Path, apps_dir: Path) -> SignedApp:
    """Build the FAB of ``app_dir`` (as ``flwr run`` would), sign it, store it."""
    from flwr.cli.build import build_fab_from_disk

    key = load_signing_key(key_path)
    if not (Path(app_dir) / "pyproject.toml").is_file():
        raise AppSigningError(f"{app_dir}: no pyproject.toml (not a Flower app)")
    fab = build_fab_from_disk(Path(app_dir))
    signed = write_signed_app(apps_dir, fab, [sign_fab(fab, key)])
    key_id = signed.verifications[0].public_key_id
    log.info(
        "signed %s (sha256 %s) with %s", signed.spec, signed.fab_sha256[:12], key_id
    )
    return signed


def load_signed_app(record_path: Path) -> SignedApp:
    """Read one ``.json`` record and check its FAB is the one it names."""
    source = str(record_path)
    try:
        row = json.loads(Path(record_path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(source, "<file>", f"not readable JSON: {exc}") from exc
    if not isinstance(row, dict):
        raise ConfigError(source, "<root>", f"expected an object: {row!r}")
    for key in ("app_id", "app_version", "fab_sha256"):
        if not isinstance(row.get(key), str):
            raise ConfigError(source, key, f"expected a string: {row.get(key)!r}")
    if not _SHA.match(row["fab_sha256"]):
        raise ConfigError(source, "fab_sha256", f"not a sha256: {row['fab_sha256']!r}")
    rows = row.get("verifications")
    if not isinstance(rows, list):
        raise ConfigError(source, "verifications", f"expected a list: {rows!r}")
    sigs = tuple(FabSignature.from_json(r, source) for r in rows if isinstance(r, dict))
    fab_path = Path(record_path).with_suffix(".fab")
    if not fab_path.is_file():
        raise ConfigError(source, "fab", f"missing {fab_path.name}")
    actual = hashlib.sha256(fab_path.read_bytes()).hexdigest()
    if actual != row["fab_sha256"]:
        raise ConfigError(
            source, "fab_sha256", f"{fab_path.name} hashes to {actual}, not the record"
        )
    return SignedApp(
        row["app_id"], row["app_version"], fab_path, Path(record_path), actual, sigs
    )


class _Handler(BaseHTTPRequestHandler):
    server: _RegistryServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.info("registry: " + format, *args)

    def _send(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, payload: object) -> None:
        self._send(code, json.dumps(payload).encode(), "application/json")

    def do_POST(self) -> None:  # noqa: N802
        if self.path != FETCH_PATH:
            self._json(404, {"detail": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(min(length, 65536)) or b"{}")
            app_id, version = str(body["app_id"]), body.get("app_version")
        except (json.JSONDecodeError, KeyError, TypeError):
            self._json(400, {"detail": "expected JSON with app_id and app_version"})
            return
        app = self.server.find(app_id, version)
        if app is None:
            self._json(404, {"detail": f"{app_id}=={version} is not a signed app here"})
            return
        port = self.server.server_address[1]
        url = f"http://{REGISTRY_HOST}:{port}{FAB_PATH}{app.fab_sha256}.fab"
        signatures = [s.to_json() for s in app.verifications]
        self._json(200, {"fab_url": url, "verifications": signatures})

    def do_GET(self) -> None:  # noqa: N802
        name = self.path[len(FAB_PATH) :] if self.path.startswith(FAB_PATH) else ""
        sha = name.removesuffix(".fab")
        app = self.server.by_sha(sha) if _SHA.match(sha) else None
        if app is None:
            self._json(404, {"detail": "not found"})
            return
        self._send(200, app.fab_path.read_bytes(), "application/octet-stream")


class _RegistryServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, apps_dir: Path, port: int) -> None:
        self.apps_dir = Path(apps_dir)
        super().__init__((REGISTRY_HOST, port), _Handler)

    def apps(self) -> list[SignedApp]:
        found = []
        for record in sorted(self.apps_dir.glob("*.json")):
            try:
                found.append(load_signed_app(record))
            except ConfigError as exc:
                log.warning("registry: skipped %s", exc)
        return found

    def find(self, app_id: str, version: object) -> SignedApp | None:
        if not isinstance(version, str):  # no "latest": runs name their version
            return None
        return next(
            (a for a in self.apps() if (a.app_id, a.app_version) == (app_id, version)),
            None,
        )

    def by_sha(self, sha: str) -> SignedApp | None:
        return next((a for a in self.apps() if a.fab_sha256 == sha), None)


class AppRegistry:
    """The registry on ``127.0.0.1:port`` in a background thread (``port=0``: any).

    Use as a context manager, or :meth:`start` / :meth:`stop`.
    """

    def __init__(self, apps_dir: Path, port: int = 0) -> None:
        if not Path(apps_dir).is_dir():
            raise ConfigError(
                "command line", "--signed-apps", f"not a directory: {apps_dir}"
            )
        self._server = _RegistryServer(apps_dir, port)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="app-registry", daemon=True
        )

    @property
    def url(self) -> str:
        """Base URL for ``FLWR_SUPERGRID_API_URL`` (``http://127.0.0.1:P/v1``)."""
        return f"http://{REGISTRY_HOST}:{self._server.server_address[1]}/v1"

    def start(self) -> AppRegistry:
        """Serve until :meth:`stop`."""
        self._thread.start()
        log.info("signed-app registry on %s (%s)", self.url, self._server.apps_dir)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(10)
        self._server.server_close()

    def __enter__(self) -> AppRegistry:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
