"""The Serve application: an ingress deployment (REST, decode, encode) and one segmentation
deployment per model; `build_app` is also the import path for `serve run` / `serve deploy`."""

from __future__ import annotations

import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from ..config import Settings
from .backend import RayBackedService
from .segmentation import SegmentationReplica
from .settings import RaySettings, load

HEALTH_CHECK_SECONDS = 2.0  # how soon Serve notices a dead replica and starts another


@serve.ingress()
class Ingress:
    """REST on Serve's HTTP proxy: the project's FastAPI app over a Ray-backed service."""

    def __init__(self, settings: Settings, replica_max_ongoing: int, **handles: DeploymentHandle):
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.service = RayBackedService(settings, handles, replica_max_ongoing)

    async def check_health(self) -> None:
        """Serve calls this every few seconds from the replica's loop: it starts the readiness poll
        at once, so /readyz turns 200 without waiting for a first request."""
        self.service.start_polling()

    def __serve_build_asgi_app__(self):
        from ..api.rest import create_app

        return create_app(self.service)


def deployment_name(model: str) -> str:
    return f"segment_{model}".replace(".", "_")


def autoscaling(low: int, high: int, ray_settings: RaySettings) -> dict:
    return {
        "min_replicas": low,
        "max_replicas": high,
        "target_ongoing_requests": ray_settings.target_ongoing,
        "upscale_delay_s": 5,
        "downscale_delay_s": 60,
    }


def build(settings: Settings, ray_settings: RaySettings):
    """The bound application for these settings (what `serve.run` deploys)."""
    device = "cuda" if ray_settings.num_gpus > 0 else "cpu"
    actor = {"num_cpus": ray_settings.num_cpus, "num_gpus": ray_settings.num_gpus}
    if ray_settings.replica_resources:
        actor["resources"] = dict(ray_settings.replica_resources)
    if device == "cpu" and settings.cpu_threads:  # else Ray sets OMP_NUM_THREADS to the replica's num_cpus
        threads = str(settings.cpu_threads)
        actor["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}
    handles = {}
    for spec in settings.models:
        deployment = serve.deployment(
            SegmentationReplica,
            name=deployment_name(spec.name),
            ray_actor_options=actor,
            max_ongoing_requests=ray_settings.max_ongoing,
            max_queued_requests=settings.max_queue,  # per ingress replica; beyond it, 429
            autoscaling_config=autoscaling(ray_settings.min_replicas, ray_settings.max_replicas, ray_settings),
            health_check_period_s=HEALTH_CHECK_SECONDS,
            health_check_timeout_s=30,
            graceful_shutdown_timeout_s=settings.drain_seconds,
        )
        handles[spec.name] = deployment.bind(settings, spec, device)
    ingress = serve.deployment(
        Ingress,
        name="ingress",
        ray_actor_options={"num_cpus": ray_settings.ingress_cpus},
        # room for everything RayBackedService admits: every replica's share plus the queue, per model
        max_ongoing_requests=max(
            64, (ray_settings.max_replicas * ray_settings.max_ongoing + settings.max_queue) * len(handles)
        ),
        autoscaling_config=autoscaling(
            ray_settings.ingress_min_replicas, ray_settings.ingress_max_replicas, ray_settings
        ),
        health_check_period_s=HEALTH_CHECK_SECONDS,
        graceful_shutdown_timeout_s=settings.drain_seconds,
    )
    return ingress.bind(settings, ray_settings.max_ongoing, **handles)


def args_to_argv(args: dict) -> list[str]:
    """`serve run` config `args:` ({"model": ["fast=random"], "device": "cpu"}) -> command-line flags."""
    argv = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        for item in value if isinstance(value, list | tuple) else [value]:
            argv += [flag, str(item)]
    return argv


def build_app(args: dict):
    """Application builder for Serve config files: `import_path: service.ray.app:build_app`, with
    `args:` holding the same settings as the flags of `python -m service.ray` (without --)."""
    settings, ray_settings, _ = load(args_to_argv(args or {}))
    return build(settings, ray_settings)
