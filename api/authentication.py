"""API tokens in either header form: `Token <key>` (Quiver's own) or `Bearer <key>`, the form
Hugging Face clients send for HF_TOKEN, so a Quiver token works as HF_TOKEN unchanged."""
from __future__ import annotations

from knox.auth import TokenAuthentication


class BearerTokenAuthentication(TokenAuthentication):
    def authenticate_header(self, request) -> str:
        return "Bearer"
