"""The API key as both protocols carry it: `X-API-Key` or `Authorization: Bearer` (gRPC: the same
names as metadata)."""

from __future__ import annotations

import hmac


def api_key_from(x_api_key: str | None, authorization: str | None) -> str | None:
    if x_api_key:
        return x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def key_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison (hmac.compare_digest), so response times do not reveal how much of
    a guessed key was right; bytes, because compare_digest refuses non-ASCII str."""
    if given is None:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8", "surrogateescape"))
