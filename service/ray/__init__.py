"""The service as a Ray Serve application: `python -m service.ray --address HOST:PORT` (docs/ray.md)."""
