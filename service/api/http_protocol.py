"""uvicorn's h11 protocol, answering request headers over the limit with a JSON 431 instead of
uvicorn's plain 400 (sent as the connection closes, which clients often see as a reset)."""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEADER_BYTES = 32 * 1024  # request line + headers
LINGER_SECONDS = 2.0  # how long the rest of an oversized request is read and dropped before closing


class _Connection(h11.Connection):
    """Remembers the status h11 suggests for the last protocol error (431 for oversized headers)."""

    error_status: int | None = None

    def next_event(self):
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.error_status = exc.error_status_hint
            raise
        # h11 checks its limit only while a request is incomplete; one that arrived whole is measured here
        if isinstance(event, h11.Request) and header_bytes(event) > MAX_HEADER_BYTES:
            self.error_status = 431
            raise h11.RemoteProtocolError("request headers too large", error_status_hint=431)
        return event


def header_bytes(request: h11.Request) -> int:
    return len(request.method) + len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)


class HttpProtocol(H11Protocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(h11.SERVER, MAX_HEADER_BYTES)
        self.discarding = False

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return  # the rest of a refused request: read so the client can finish sending and see the answer
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        if self.conn.error_status != 431:
            super().send_400_response(msg)
            return
        body = json.dumps(
            {
                "error": {
                    "code": "headers_too_large",
                    "message": f"request headers exceed the limit of {MAX_HEADER_BYTES} bytes",
                }
            }
        ).encode()
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        self.transport.write(head + body)
        # Close our side for writing but keep reading: closing outright while the client is still
        # sending its headers resets the connection, and the client never reads the 431.
        self.discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)
