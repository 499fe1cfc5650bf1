"""uvicorn's httptools protocol (llhttp, in C: far less CPU per request than h11 for large bodies),
answering request headers over the limit with a JSON 431 instead of uvicorn's plain 400 (sent as
the connection closes, which clients often see as a reset). llhttp has no header limit of its own."""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 32 * 1024  # request line + headers
LINGER_SECONDS = 2.0  # how long the rest of an oversized request is read and dropped before closing


class HeadersTooLarge(Exception):
    """Raised from a parser callback; httptools turns it into the HttpParserError uvicorn handles."""


class HttpProtocol(HttpToolsProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.discarding = False
        self.too_large = False
        self.in_head = True  # between requests or inside a request line and headers
        self.head_bytes = 0  # parsed bytes of the current request line and headers
        self.unparsed_head_bytes = 0  # raw bytes received while in a head (a header never ends)

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return  # the rest of a refused request: read so the client can finish sending and see the answer
        if self.in_head:
            self.unparsed_head_bytes += len(data)
        super().data_received(data)
        answered = self.discarding or self.transport.is_closing()  # a 431 or 400 went out just now
        # a head still open after more than the limit (the slack: this chunk may end the last body)
        if self.in_head and not answered and self.unparsed_head_bytes > MAX_HEADER_BYTES + len(data):
            self.too_large = True
            self.send_400_response("request headers too large")

    # -- parser callbacks: count the head ----------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head, self.head_bytes = True, 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count(len(url) + 16)  # method, version and line end

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        self.in_head, self.unparsed_head_bytes = False, 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head = True

    def _count(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEADER_BYTES:
            self.too_large = True
            raise HeadersTooLarge

    def send_400_response(self, msg: str) -> None:
        if not self.too_large:
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
