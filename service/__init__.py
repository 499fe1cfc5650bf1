"""bisenet-serve: the segmentation microservice (REST + gRPC front end, GPU worker processes)."""

__version__ = "0.1.0"
