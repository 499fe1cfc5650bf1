"""The API key as both protocols carry it: `X-API-Key` or `Authorization: Bearer` (gRPC: the same
names as metadata)."""

from __future__ import annotations


def api_key_from(x_api_key: str | None, authorization: str | None) -> str | None:
    if x_api_key:
        return x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None
