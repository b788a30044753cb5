"""Every API error is JSON: {"error": {"code", "message", "field"?, "fields"?}}."""
from __future__ import annotations

from django.core.exceptions import RequestDataTooBig, TooManyFilesSent
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler

from hub.errors import SERVICE_UNAVAILABLE, QuiverError, is_backend_outage

RETRY_AFTER_SECONDS = "5"


def error_body(code: str, message: str, **extra) -> dict:
    return {"error": {"code": code, "message": message, **{k: v for k, v in extra.items() if v is not None}}}


def _first_message(detail) -> str:
    if isinstance(detail, dict):
        field, value = next(iter(detail.items()))
        return f"{field}: {_first_message(value)}"
    if isinstance(detail, list) and detail:
        return _first_message(detail[0])
    return str(detail)


def json_exception_handler(exc, context):
    if isinstance(exc, QuiverError):
        return Response(error_body(exc.code, exc.message, field=exc.field), status=exc.status_code)
    if is_backend_outage(exc):
        return service_unavailable_response()
    if isinstance(exc, (RequestDataTooBig, TooManyFilesSent)):
        return Response(error_body("request_too_large", str(exc)), status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    response = exception_handler(exc, context)
    if response is None:
        return None  # a real bug: Django's 500 handling and logging apply
    if isinstance(exc, exceptions.ValidationError):
        response.data = error_body("invalid", _first_message(exc.detail), fields=exc.detail)
    else:
        code = exc.get_codes() if isinstance(exc, exceptions.APIException) else "error"
        response.data = error_body(code if isinstance(code, str) else "error", _first_message(response.data))
    return response


def service_unavailable_response() -> Response:
    return Response(error_body("service_unavailable", SERVICE_UNAVAILABLE), status=status.HTTP_503_SERVICE_UNAVAILABLE,
                    headers={"Retry-After": RETRY_AFTER_SECONDS})
