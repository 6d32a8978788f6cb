"""REST API conventions shared by every app: one error shape with a sentence a user understands."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions, parsers, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The request conflicts with the current state of the resource."
    default_code = "conflict"


class JSONParser(parsers.JSONParser):
    """DRF's, plus: a body nested deeper than Python's recursion limit (``[[[[...]]]]``) is a 400 like
    any other bad JSON, not a RecursionError and a 500."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError("JSON parse error - the body is nested too deeply.") from None


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, plus Django's ValidationError (raised by actions) turned into a 400."""
    if isinstance(exc, DjangoValidationError):
        if hasattr(exc, "error_dict"):
            detail: Any = {k: [str(m) for e in v for m in e.messages] for k, v in exc.error_dict.items()}
            if "detail" in detail:  # a whole-request error reads as DRF's own: {"detail": "sentence"}
                detail["detail"] = " ".join(detail["detail"])
        else:
            detail = {"detail": exc.messages[0] if len(exc.messages) == 1 else exc.messages}
        return Response(detail, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    return drf_exception_handler(exc, context)


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """The site's 404. Under /api/ a path no view matches (``/api/v1/services/garbage/``) answers
    in the API's shape, JSON, like every other API error, not with the HTML page."""
    if request.path.startswith("/api/"):
        return JsonResponse(
            {"detail": f"No API endpoint at {request.path[:200]}; the endpoints are listed at /api/docs/."}, status=404
        )
    return defaults.page_not_found(request, exception)
