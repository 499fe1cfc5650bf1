"""Settings of the Ray Serve application: the service's own flags plus the few that only Ray needs."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from ..config import ConfigError, Settings, build_parser, load_settings


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: the builder runs inside `serve run`/`serve deploy`, already connected
    app_name: str = "bisenet"
    num_gpus: float = 0.0  # per segmentation replica; 0 runs the engine on the replica's CPU
    num_cpus: float = 1.0  # per segmentation replica
    ingress_cpus: float = 0.5  # per ingress replica (decode, encode, HTTP)
    min_replicas: int = 1  # per model
    max_replicas: int = 1
    ingress_min_replicas: int = 1
    ingress_max_replicas: int = 1
    target_ongoing: float = 2.0  # autoscaling target: requests in flight per replica
    max_ongoing: int = 8  # per segmentation replica; more wait in the ingress's queue
    replica_resources: dict[str, float] = field(default_factory=dict)  # custom resources per segmentation replica
    ready_timeout: float = 600.0  # seconds the launcher waits for the application to run


def _env(name: str, default):
    return os.environ.get(f"BISENET_RAY_{name}", default)


def ray_parser() -> argparse.ArgumentParser:
    """Only the Ray flags; the rest go to the service's own parser (config.build_parser)."""
    d = RaySettings()
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("Ray Serve")
    g.add_argument(
        "--address", default=_env("ADDRESS", None), help="Ray cluster address, HOST:PORT [BISENET_RAY_ADDRESS]"
    )
    g.add_argument("--app-name", default=_env("APP_NAME", d.app_name), help="Serve application name")
    g.add_argument(
        "--num-gpus",
        default=_env("NUM_GPUS", None),
        help="GPUs per segmentation replica (default: 1 with --device cuda*, 0 with --device cpu; "
        "with auto, 1 when the cluster has GPUs) [BISENET_RAY_NUM_GPUS]",
    )
    g.add_argument("--num-cpus", default=_env("NUM_CPUS", d.num_cpus), help="CPUs per segmentation replica")
    g.add_argument("--ingress-cpus", default=_env("INGRESS_CPUS", d.ingress_cpus), help="CPUs per ingress replica")
    g.add_argument(
        "--min-replicas", default=_env("MIN_REPLICAS", d.min_replicas), help="segmentation replicas per model, at least"
    )
    g.add_argument("--max-replicas", default=_env("MAX_REPLICAS", None), help="... at most (default: --min-replicas)")
    g.add_argument("--ingress-min-replicas", default=_env("INGRESS_MIN_REPLICAS", d.ingress_min_replicas))
    g.add_argument("--ingress-max-replicas", default=_env("INGRESS_MAX_REPLICAS", None))
    g.add_argument(
        "--target-ongoing",
        default=_env("TARGET_ONGOING", d.target_ongoing),
        help="autoscaling target: requests in flight per replica",
    )
    g.add_argument(
        "--max-ongoing",
        default=_env("MAX_ONGOING", d.max_ongoing),
        help="requests a segmentation replica holds at once (>= --max-batch to let batches fill)",
    )
    g.add_argument(
        "--replica-resources",
        default=_env("REPLICA_RESOURCES", ""),
        help="custom Ray resources each segmentation replica needs, NAME=AMOUNT[,NAME=AMOUNT]",
    )
    g.add_argument(
        "--ready-timeout", default=_env("READY_TIMEOUT", d.ready_timeout), help="seconds to wait for the deployment"
    )
    return p


def _number(value, flag: str, kind=int, minimum: float = 0):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"bad --{flag} {value!r}: expected a {kind.__name__}") from None
    if number < minimum:
        raise ConfigError(f"bad --{flag} {value!r}: must be at least {minimum}")
    return number


def parse_resources(text: str) -> dict[str, float]:
    resources = {}
    for item in filter(None, (v.strip() for v in text.split(","))):
        name, sep, amount = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"bad --replica-resources item {item!r}: expected NAME=AMOUNT")
        resources[name] = _number(amount, "replica-resources", float, minimum=0)
    return resources


def default_gpus(devices: tuple[str, ...]) -> float | None:
    """GPUs per replica implied by --device; None for 'auto' (decided from the cluster's resources)."""
    if devices == ("cpu",):
        return 0.0
    if len(devices) == 1 and devices[0].startswith("cuda"):
        return 1.0
    if devices == ("auto",):
        return None
    raise ConfigError(f"--device {','.join(devices)}: on Ray use cpu, cuda or auto: Ray assigns each replica its GPU")


def load(argv: list[str]) -> tuple[Settings, RaySettings, bool]:
    """(service settings, Ray settings, whether --num-gpus was left to the cluster) from flags."""
    ray_args, rest = ray_parser().parse_known_args(argv)
    settings = load_settings(rest)
    gpus = (
        default_gpus(settings.devices) if ray_args.num_gpus is None else _number(ray_args.num_gpus, "num-gpus", float)
    )
    # At least one: the ingress answers 503 at once while a model has no running replica, so a
    # deployment scaled to zero would never see the request that scales it back up.
    min_replicas = _number(ray_args.min_replicas, "min-replicas", minimum=1)
    max_replicas = _number(ray_args.max_replicas or min_replicas, "max-replicas", minimum=1)
    ingress_min = _number(ray_args.ingress_min_replicas, "ingress-min-replicas", minimum=1)
    ingress_max = _number(ray_args.ingress_max_replicas or ingress_min, "ingress-max-replicas", minimum=1)
    if max_replicas < min_replicas or ingress_max < ingress_min:
        raise ConfigError("--max-replicas must be at least --min-replicas (and likewise for the ingress)")
    ray_settings = RaySettings(
        address=ray_args.address,
        app_name=ray_args.app_name,
        num_gpus=gpus or 0.0,
        num_cpus=_number(ray_args.num_cpus, "num-cpus", float),
        ingress_cpus=_number(ray_args.ingress_cpus, "ingress-cpus", float),
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        ingress_min_replicas=ingress_min,
        ingress_max_replicas=ingress_max,
        target_ongoing=_number(ray_args.target_ongoing, "target-ongoing", float, minimum=0.1),
        max_ongoing=_number(ray_args.max_ongoing, "max-ongoing", minimum=1),
        replica_resources=parse_resources(ray_args.replica_resources),
        ready_timeout=_number(ray_args.ready_timeout, "ready-timeout", float, minimum=1),
    )
    return settings, ray_settings, gpus is None


def help_text() -> str:
    service = build_parser()
    service.prog = "python -m service.ray"
    service.description = "The segmentation service as a Ray Serve application on an existing Ray cluster"
    return service.format_help() + "\n" + ray_parser().format_help().split("\n", 2)[-1]
