"""Users and API tokens (django-rest-knox stores only a hash of each token)."""
from __future__ import annotations

from knox.models import AuthToken


def create_api_token(user, *, description: str = "") -> str:
    """A new token for `user`; the plain key is returned once and never stored."""
    _, key = AuthToken.objects.create(user=user, expiry=None)
    return key
