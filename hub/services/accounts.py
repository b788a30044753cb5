"""Users and API tokens (django-rest-knox stores only a hash of each token)."""
from __future__ import annotations

from knox.models import AuthToken

from hub.errors import NotFound


def create_api_token(user, *, description: str = "") -> str:
    """A new token for `user`; the plain key is returned once and never stored."""
    _, key = AuthToken.objects.create(user=user, expiry=None)
    return key


def revoke_api_token(user, token_key: str) -> None:
    """Revoke one of `user`'s tokens by its prefix (knox's `token_key`, shown in the token list)."""
    deleted, _ = AuthToken.objects.filter(user=user, token_key=token_key).delete()
    if not deleted:
        raise NotFound("token_not_found", "No such token (it may have been revoked already).")
