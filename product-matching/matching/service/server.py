"""The uvicorn server around the app, with the connection-level limits of conf/serve.yaml.

    uvicorn.Server(server_config(app, host, port, ...)).run()

Limits: at most `max_connections` open connections and tasks (uvicorn answers 503 beyond),
`header_timeout_s` for a new connection to send its request headers (uvicorn itself waits
forever, so 3,000 half-sent requests stayed open), `keep_alive_s` between requests, and
rate-limited error logs (`logs.RateLimit`). The request body's deadline is the app's
(`limits.BodyTimeout`).
"""

from __future__ import annotations

import ipaddress
import logging

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from matching.service.logs import limit_log_floods

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it resolves to who knows what
        return False


def check_exposure(host: str, api_token: str | None) -> None:
    """Refuse to serve beyond this machine without an API token (anyone on the network could
    add postings); warn whenever the service is reachable from the network."""
    if is_loopback(host):
        return
    if not api_token:
        raise SystemExit(
            f"host={host} serves beyond this machine, so POST /gallery needs a token: set "
            "api_token=<secret> (or the MATCH_API_TOKEN environment variable), or bind "
            "host=127.0.0.1"
        )
    log.warning(
        "Serving on host=%s: reachable from the network, without TLS. Adding postings needs "
        "the API token; put a TLS proxy in front for anything beyond a trusted network.",
        host,
    )


def header_timeout_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection that has not sent a complete request
    head within `timeout_s` of opening (a stalled or slowloris client)."""

    class HeaderTimeout(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeout


def server_config(
    app,
    host: str,
    port: int,
    log_level: str = "info",
    max_connections: int = 64,
    header_timeout_s: float = 10.0,
    keep_alive_s: float = 5.0,
) -> uvicorn.Config:
    """uvicorn's config for the app; logging configured and rate-limited."""
    config = uvicorn.Config(
        app,
        host=host,
        port=int(port),
        log_level=log_level,
        http=header_timeout_protocol(float(header_timeout_s)),
        limit_concurrency=int(max_connections),
        timeout_keep_alive=float(keep_alive_s),
    )
    limit_log_floods()  # after Config: it (re)configures uvicorn's loggers
    return config
