"""503 instead of 500 when PostgreSQL or Redis is down, for every view: API views get it from
api.exceptions (DRF's handler), this covers the rest (web pages, the Hub-compatible reads)."""
from __future__ import annotations

from django.http import HttpResponse, JsonResponse

from api.exceptions import RETRY_AFTER_SECONDS, error_body
from hub.errors import SERVICE_UNAVAILABLE, is_backend_outage


class BackendOutageMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not is_backend_outage(exception):
            return None
        if request.path.startswith("/api/") or "json" in request.headers.get("Accept", ""):
            response = JsonResponse(error_body("service_unavailable", SERVICE_UNAVAILABLE), status=503)
        else:
            response = HttpResponse(SERVICE_UNAVAILABLE, status=503, content_type="text/plain; charset=utf-8")
        response["Retry-After"] = RETRY_AFTER_SECONDS
        return response


class RefuseNulCharactersMiddleware:
    """A NUL character in the query string is refused with a 400: PostgreSQL text cannot hold one, so
    such a value would otherwise fail inside a query (a 500) wherever a parameter reaches SQL
    unvalidated (filters, revisions, the Hub-compatible reads, web pages)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if any("\x00" in key or any("\x00" in value for value in values) for key, values in request.GET.lists()):
            return JsonResponse(error_body("invalid_characters", "Query parameters may not contain NUL characters."),
                                status=400)
        return self.get_response(request)
