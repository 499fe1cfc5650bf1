"""Python clients for the segmentation service: REST (`SegmentationClient`, and
`AsyncSegmentationClient` for asyncio) and gRPC (`GrpcSegmentationClient` and
`AsyncGrpcSegmentationClient`, with `stream()` for video). They return `SegmentResult`, raise
`SegmentationError` with the same error codes, and send the caller's OpenTelemetry trace context
along."""

from .rest import AsyncSegmentationClient, SegmentationClient
from .results import SegmentationError, SegmentResult

__all__ = [
    "AsyncGrpcSegmentationClient",
    "AsyncSegmentationClient",
    "GrpcSegmentationClient",
    "SegmentResult",
    "SegmentationClient",
    "SegmentationError",
    "StreamResult",
]


def __getattr__(name: str):
    # gRPC on first use, so a REST-only user never loads grpc
    if name in ("AsyncGrpcSegmentationClient", "GrpcSegmentationClient", "StreamResult"):
        from . import grpc

        return getattr(grpc, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
