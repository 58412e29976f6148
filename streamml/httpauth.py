"""Bearer-token authentication of the HTTP APIs (POST /predict, /healthz)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from streamml.settings import Settings


def api_token(settings: Settings) -> bytes | None:
    """The configured token (STREAMML_HTTP_TOKEN, or read from STREAMML_HTTP_TOKEN_FILE), or None."""
    return settings.http_token.get_secret_value().strip().encode() if settings.http_token else None


def authorized(headers: Mapping[str, str], token: bytes | None) -> bool:
    """Whether a request may proceed: no token configured, or `Authorization: Bearer <token>` with the
    token compared in constant time."""
    if token is None:
        return True
    scheme, _, given = headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)
