"""The admin port: ``GET /metrics`` (Prometheus text) and ``GET /healthz`` (JSON).

Kept off the client port so that a service slug can never shadow it and so that it can be bound
to another interface than the data plane in production. One request per connection: it is
scraped every few seconds, not worth keep-alive.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

import httptools

from proxy.metrics import render

if TYPE_CHECKING:
    from proxy.app import Proxy


class Admin(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        if self.transport is None:
            return
        path = self.url.partition(b"?")[0]
        proxy = self.proxy
        table = proxy.table
        if path == b"/metrics":
            status, ctype = b"200 OK", b"text/plain; version=0.0.4; charset=utf-8"
            body = render(table, proxy.gauges(), proxy.failovers).encode()
        elif path == b"/healthz":
            status, ctype = b"200 OK", b"application/json"
            body = json.dumps(
                {
                    "status": "ok",
                    "endpoints": len(table.endpoints),
                    "routes": sum(len(e.routes) for e in table.endpoints.values()),
                    "routing_table_loaded": table.loaded,
                    "redis_connected": table.connected,
                    "routing_table_age_seconds": round(time.time() - table.loaded_at, 3) if table.loaded else None,
                    "client_connections": len(proxy.downstreams),
                    "instance": proxy.instance,
                }
            ).encode()
        else:
            status, ctype = b"404 Not Found", b"application/json"
            body = b'{"error": {"code": "not_found", "message": "The admin port serves /metrics and /healthz."}}'
        self.transport.write(
            b"HTTP/1.1 %b\r\nContent-Type: %b\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
            % (status, ctype, len(body), body)
        )
        self.transport.close()
