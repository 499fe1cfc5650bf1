"""Python clients for the segmentation service: REST (`SegmentationClient`) and gRPC
(`GrpcSegmentationClient`, with `stream()` for video). Both return `SegmentResult` and raise
`SegmentationError` with the same error codes."""

from .rest import SegmentationClient
from .results import SegmentationError, SegmentResult

__all__ = ["GrpcSegmentationClient", "SegmentResult", "SegmentationClient", "SegmentationError", "StreamResult"]


def __getattr__(name: str):
    # gRPC on first use, so a REST-only user never loads grpc
    if name in ("GrpcSegmentationClient", "StreamResult"):
        from . import grpc

        return getattr(grpc, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
