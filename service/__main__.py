"""`bisenet serve` (also `python -m service`, the Docker entry point): start the segmentation service."""

from __future__ import annotations

import asyncio
import sys

from model.checkpoint import CheckpointError

from .config import ConfigError, load_settings
from .core import fetch_weights
from .errors import ServiceError
from .logs import configure as configure_logging
from .worker.link import resolve_devices


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        configure_logging(settings.log_level, settings.log_format)
        resolve_devices(settings.devices)  # a missing GPU stops start-up here, with a clear message
        weights = fetch_weights(settings)
    except (ConfigError, ServiceError, CheckpointError, ValueError, KeyError) as exc:
        print(f"bisenet serve: error: {exc}", file=sys.stderr)
        return 2
    from .server import serve

    return asyncio.run(serve(settings, weights))


if __name__ == "__main__":
    sys.exit(main())
