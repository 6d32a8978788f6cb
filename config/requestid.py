"""The request id of each web request, in its log lines and its response (``X-Request-ID``).

A request that comes through the proxy, or a load balancer, already has one: it is kept when it
looks like an id (up to 128 visible ASCII characters), else a new one is made. The id, and the
service's slug when the URL names one, are bound to the log context (serving/core/logs.py) for
everything the request logs, and one access line is logged per request (logger ``modelserve.access``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse

from serving.core import logs

log = logging.getLogger("modelserve.access")
HEADER = "X-Request-ID"


def request_id(request: HttpRequest) -> str:
    given = request.headers.get(HEADER, "")
    return given if logs.REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        rid = request_id(request)
        request.request_id = rid  # type: ignore[attr-defined]
        logs.bind(request_id=rid, service=None, route=None)
        started = time.monotonic()
        try:
            response = self.get_response(request)
            response[HEADER] = rid
            log.info(
                "%s %s %d",
                request.method,
                request.path,
                response.status_code,
                extra={"status": response.status_code, "duration_ms": round((time.monotonic() - started) * 1000, 1)},
            )
            return response
        finally:
            logs.bind(request_id=None, service=None, route=None)

    def process_view(self, request: HttpRequest, view: Any, args: Any, kwargs: dict[str, Any]) -> None:
        match = request.resolver_match
        if match is not None and "services/<uuid:" in match.route:
            service = kwargs.get("service_id") or kwargs.get("pk")  # pages and API name it differently
            if service:
                logs.bind(service=str(service))
