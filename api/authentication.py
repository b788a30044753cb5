"""API tokens in either header form: `Token <key>` (Quiver's own) or `Bearer <key>`, the form
Hugging Face clients send for HF_TOKEN, so a Quiver token works as HF_TOKEN unchanged."""
from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from knox.auth import TokenAuthentication


class BearerTokenAuthentication(TokenAuthentication):
    def authenticate_header(self, request) -> str:
        return "Bearer"


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """Documents the Bearer form in the OpenAPI schema (drf-spectacular finds it by subclassing)."""

    target_class = BearerTokenAuthentication
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "a Quiver API token, as HF_TOKEN sends it"}
