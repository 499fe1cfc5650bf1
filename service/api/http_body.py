"""Reading an HTTP request body within a size limit (REST and v2 REST)."""

from __future__ import annotations

from fastapi import Request
from starlette.requests import ClientDisconnect

from ..errors import ServiceError


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (never read whole)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServiceError("too_large", f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError("too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def discard_body(request: Request, limit: int) -> None:
    """Read and drop what is left of the body (up to `limit`) before an error answer: a client that
    sends the whole body before reading (Python's urllib) otherwise meets a closed connection
    instead of the answer. Past the limit the connection is closed anyway."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return
    except (RuntimeError, ClientDisconnect):  # already read, or the client is gone
        return
