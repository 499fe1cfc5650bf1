"""Front doors: REST (FastAPI), gRPC (grpc.aio) and the image codecs they share."""
