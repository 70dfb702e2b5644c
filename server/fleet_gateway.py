"""The coordinator's only public listener: a gateway that forwards the Fleet API.

Flower 1.42's SuperLink serves its Fleet (``/v1/fleet/*``, what SuperNodes
call), Control (``/v1/control/*``: register nodes, start runs, ship code) and
Runtime (``/v1/runtime/*``: the ServerApp's) APIs on one HTTP listener, and
the Control API has no authentication in the open-source build. So the
SuperLink listens on 127.0.0.1 only, and this gateway listens on the public
address: it forwards ``POST /v1/fleet/<call>`` (``<call>`` one lower-case
word with dashes, so no ``..`` or other API can be reached) to the SuperLink
and answers 404 to everything else, before reading the request body.

TLS: the gateway serves the SuperLink's own certificate (SuperNodes keep
``--root-certificates ca.crt``) and dials the SuperLink at
``https://127.0.0.1:<port>``, verifying it against the same CA, so the
certificate must name 127.0.0.1 (``mammofed-server certs`` adds it unless
``--no-loopback``). ``tls=None`` is plain HTTP both ways (loopback tests).
Node authentication is end to end: the SuperNode's signed headers pass
through unchanged and the SuperLink checks them.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from common.wire.tls import TlsFiles
from server.process import ProcessError

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
_CALL = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
#: Not forwarded in either direction (RFC 9110 hop-by-hop, and the Host).
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=600.0, pool=30.0)


@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway listens and where the SuperLink is.

    ``upstream_port`` is the SuperLink's port on 127.0.0.1.
    """

    host: str
    port: int
    upstream_port: int
    tls: TlsFiles | None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536 or not 0 < self.upstream_port < 65536:
            raise ProcessError(
                f"gateway ports must be 1-65535: {self.port}, {self.upstream_port}"
            )

    @property
    def upstream(self) -> str:
        """Base URL of the SuperLink."""
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://127.0.0.1:{self.upstream_port}"


def _refuse(path: str) -> JSONResponse:
    return JSONResponse(
        {"detail": f"{path}: only the Fleet API (POST {FLEET_PREFIX}*) is served here"},
        status_code=404,
    )


def create_app(cfg: GatewayConfig) -> Starlette:
    """The ASGI app: forwards ``POST /v1/fleet/<call>``, 404 for anything else."""
    verify: ssl.SSLContext | bool = False
    if cfg.tls is not None:
        verify = ssl.create_default_context(cafile=str(cfg.tls.ca_certfile))
    clients: list[httpx.AsyncClient] = []

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        clients.append(httpx.AsyncClient(verify=verify, timeout=_TIMEOUT))
        try:
            yield
        finally:
            await clients.pop().aclose()

    async def forward(request: Request) -> Response:
        call = request.path_params["call"]
        if request.method != "POST" or not _CALL.match(call):
            return _refuse(request.url.path)
        # Content-Length stays: the body streams through with the same length
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        upstream = clients[0].build_request(
            "POST",
            f"{cfg.upstream}{FLEET_PREFIX}{call}",
            headers=headers,
            content=request.stream(),
        )
        try:
            reply = await clients[0].send(upstream, stream=True)
        except httpx.HTTPError as exc:
            log.warning("fleet gateway: SuperLink unreachable for %s: %s", call, exc)
            return JSONResponse({"detail": "SuperLink unreachable"}, status_code=502)
        out = {k: v for k, v in reply.headers.items() if k.lower() not in _HOP}
        return StreamingResponse(
            reply.aiter_raw(),
            status_code=reply.status_code,
            headers=out,
            background=BackgroundTask(reply.aclose),
        )

    async def refuse(request: Request) -> Response:
        return _refuse(request.url.path)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(
        routes=[
            Route(FLEET_PREFIX + "{call}", forward, methods=methods),
            Route("/{rest:path}", refuse, methods=methods),
        ],
        lifespan=lifespan,
    )


class FleetGateway:
    """The gateway on ``cfg.host:cfg.port`` in a background thread.

    Use as a context manager, or :meth:`start` / :meth:`stop`.
    """

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        tls = cfg.tls
        self._server = uvicorn.Server(
            uvicorn.Config(
                app=create_app(cfg),
                host=cfg.host,
                port=cfg.port,
                ssl_certfile=None if tls is None else str(tls.certfile),
                ssl_keyfile=None if tls is None else str(tls.keyfile),
                log_level="warning",
                access_log=False,
                lifespan="on",
            )
        )
        self._thread = threading.Thread(
            target=self._server.run, name="fleet-gateway", daemon=True
        )

    def start(self, timeout_s: float = 30.0) -> FleetGateway:
        """Start serving; raises :class:`ProcessError` if it does not come up."""
        cfg = self.cfg
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ProcessError(
                    f"Fleet gateway did not start on {cfg.host}:{cfg.port}"
                )
            time.sleep(0.05)
        log.info("Fleet gateway on %s:%d -> %s", cfg.host, cfg.port, cfg.upstream)
        return self

    def stop(self) -> None:
        """Stop serving (open requests get a few seconds)."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(15)

    def __enter__(self) -> FleetGateway:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
