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
