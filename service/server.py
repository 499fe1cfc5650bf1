"""Runs the front end: workers, FastAPI (uvicorn) and gRPC on one asyncio loop, and SIGTERM draining."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import uvicorn

from .api.http_protocol import HttpProtocol
from .api.rest import create_app
from .config import Settings
from .core import SegmentationService
from .worker.shm import usable_shm_bytes

log = logging.getLogger("service")


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # signals are ours: SIGTERM drains before uvicorn is told to exit


async def serve(settings: Settings, model_weights: dict[str, str]) -> int:
    service = SegmentationService(settings, model_weights, usable_shm_bytes(settings.shm_bytes))
    app = create_app(service)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.http_port,
        log_level=settings.log_level,
        http=HttpProtocol,  # httptools, answering oversized request headers with 431
        log_config=None,  # uvicorn's lines go through the service's handler, in its format
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=5,
    )
    http = _Uvicorn(config)
    grpc_server = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    http_task = asyncio.create_task(http.serve())  # health and readiness answer while models load
    try:
        if settings.grpc_port:
            from .api.grpc_server import start_grpc_server

            grpc_server = await start_grpc_server(service, settings)
        start_task = asyncio.create_task(service.start())
        stop_task = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({start_task, stop_task, http_task}, return_when=asyncio.FIRST_COMPLETED)
        if start_task in done and start_task.exception():
            log.error("start-up failed: %s", start_task.exception())
            return 1
        if http_task in done:
            log.error("the HTTP server stopped (is port %s free?)", settings.http_port)
            return 1
        if not start_task.done():
            start_task.cancel()
        await stop.wait()
        log.info(
            "draining: refusing new work, finishing %d in flight (up to %.0fs)",
            service.dispatcher.in_flight,
            settings.drain_seconds,
        )
        if grpc_server is not None:
            grpc_server.health_not_serving()
        await service.drain_and_stop()
        return 0
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=1)
        http.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(http_task, 10)
        with contextlib.suppress(Exception):
            await service.dispatcher.stop()
