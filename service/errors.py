"""Errors are part of the API: one class, mapped once to HTTP status, gRPC code and metric reason."""

from __future__ import annotations

from dataclasses import dataclass

# code -> (HTTP status, gRPC status name, rejection reason for seg_requests_rejected_total)
CODES = {
    "invalid_image": (400, "INVALID_ARGUMENT", "invalid_image"),
    "bad_request": (422, "INVALID_ARGUMENT", "bad_request"),
    "unauthorized": (401, "UNAUTHENTICATED", "unauthorized"),
    "not_found": (404, "NOT_FOUND", "not_found"),
    "too_large": (413, "RESOURCE_EXHAUSTED", "too_large"),
    "unsupported_media_type": (415, "INVALID_ARGUMENT", "unsupported_media_type"),
    "queue_full": (429, "RESOURCE_EXHAUSTED", "queue_full"),
    "not_ready": (503, "UNAVAILABLE", "not_ready"),
    "worker_restarting": (503, "UNAVAILABLE", "worker_restarting"),
    "deadline_exceeded": (504, "DEADLINE_EXCEEDED", "deadline"),
    "cancelled": (499, "CANCELLED", "cancelled"),
    "internal": (500, "INTERNAL", "internal"),
    "method_not_allowed": (405, "UNIMPLEMENTED", "method_not_allowed"),
    "headers_too_large": (431, "RESOURCE_EXHAUSTED", "headers_too_large"),
}
# code -> when it is answered (OpenAPI descriptions; README's error table says the same at length)
DESCRIPTIONS = {
    "invalid_image": "The body is not a decodable image",
    "bad_request": "Bad parameters, a malformed multipart body or gRPC message",
    "unauthorized": "Missing or wrong API key",
    "not_found": "Unknown model or path",
    "too_large": "Body or image too large",
    "unsupported_media_type": "Wrong or missing content type",
    "queue_full": "Overloaded; see Retry-After",
    "not_ready": "Loading or draining; see Retry-After",
    "worker_restarting": "The worker died while running the request; retry",
    "deadline_exceeded": "The deadline passed",
    "cancelled": "The client cancelled the call",
    "internal": "A bug in the service",
    "method_not_allowed": "The path does not take this HTTP method",
    "headers_too_large": "Request headers over the limit",
}


@dataclass
class ServiceError(Exception):
    code: str
    message: str
    retry_after: float | None = None  # seconds; sent as Retry-After / retry-after metadata

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown error code {self.code}")
        super().__init__(self.message)

    @property
    def http_status(self) -> int:
        return CODES[self.code][0]

    @property
    def grpc_status(self) -> str:
        return CODES[self.code][1]

    @property
    def reason(self) -> str:
        return CODES[self.code][2]

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}
