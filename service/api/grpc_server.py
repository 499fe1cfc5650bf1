"""The gRPC server: the Segmentation service, the KServe v2 GRPCInferenceService, standard health (following readiness, NOT_SERVING on
drain), reflection, message limits from the REST limits, keepalive and TLS."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from ..config import Settings
from ..core import SegmentationService
from ..proto import inference_pb2, segmentation_pb2
from ..proto import inference_pb2_grpc as v2_grpc
from ..proto import segmentation_pb2_grpc as pb_grpc
from .grpc import SERVICE_NAME, SegmentationServicer, message_limit
from .v2_grpc import SERVICE_NAME as V2_SERVICE_NAME
from .v2_grpc import InferenceServicer

log = logging.getLogger("service.grpc")
HEALTH_POLL_SECONDS = 0.25


class GrpcServer:
    """The running gRPC server; health follows service.ready until draining starts."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        service: SegmentationService,
        port: int,
    ):
        self.server = server
        self.health = health_servicer
        self.service = service
        self.port = port
        self.draining = False
        self._poller: asyncio.Task | None = None

    async def start(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        self._poller = asyncio.create_task(self._follow_readiness())

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _follow_readiness(self) -> None:
        last = None
        while not self.draining:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if self.service.ready
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            if status != last:
                await self._set_health(status)
                last = status
            await asyncio.sleep(HEALTH_POLL_SECONDS)

    def health_not_serving(self) -> None:
        """Draining: NOT_SERVING from now on (called from the SIGTERM path)."""
        self.draining = True
        if self._poller is not None:
            self._poller.cancel()
        asyncio.get_running_loop().create_task(self.health.enter_graceful_shutdown())

    async def stop(self, grace: float | None = None) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self.server.stop(grace)


def reflection_pool(*files) -> descriptor_pool.DescriptorPool:
    """One pool holding every served file (and what they import) for reflection: the v2 stubs
    live in a pool of their own, not protobuf's default one that reflection reads otherwise."""
    pool, added = descriptor_pool.DescriptorPool(), set()

    def add(file) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.AddSerializedFile(proto.SerializeToString())
        added.add(file.name)

    for file in files:
        add(file)
    return pool


async def start_grpc_server(service: SegmentationService, settings: Settings) -> GrpcServer:
    limit = message_limit(settings)
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 60_000),  # ping idle connections so dead peers free their streams
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_SegmentationServicer_to_server(SegmentationServicer(service, settings), server)
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service, settings), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    pool = reflection_pool(
        segmentation_pb2.DESCRIPTOR, inference_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR
    )
    reflection.enable_server_reflection(
        (SERVICE_NAME, V2_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server, pool
    )
    host = f"[{settings.host}]" if ":" in settings.host and not settings.host.startswith("[") else settings.host
    address = f"{host}:{settings.grpc_port}"  # IPv6 literals in brackets, as gRPC wants them
    if settings.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())]
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if not port:
        raise RuntimeError(f"gRPC could not bind {address} (is the port free?)")
    wrapper = GrpcServer(server, health_servicer, service, port)
    await wrapper.start()
    log.info("gRPC on %s%s", address, " (TLS)" if settings.tls_cert else "")
    return wrapper
