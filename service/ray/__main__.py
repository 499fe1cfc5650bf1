"""`python -m service.ray --address HOST:PORT [flags]` (also `bisenet serve --ray HOST:PORT`): deploy the
service on an existing Ray cluster, block, and undeploy on SIGTERM or Ctrl-C (exit 0).

Exit codes: 0 after a clean undeploy; 1 when the application fails to deploy (the replicas' reason
is printed); 2 for bad settings, an address that does not answer or a cluster that lacks the GPUs.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

from ..config import ConfigError
from .settings import RaySettings, help_text, load

log = logging.getLogger("service.ray")
CONNECT_TIMEOUT = 5.0


class LaunchError(Exception):
    """Stops the launcher before anything is deployed (exit 2)."""


def check_reachable(address: str) -> None:
    """A TCP connection to the cluster's GCS first, so a dead address fails in seconds, not minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise LaunchError(f"bad --address {address!r}: expected HOST:PORT of the Ray head (its GCS port)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise LaunchError(f"no Ray cluster answers at {address}: {exc.strerror or exc}") from None


def connect(address: str) -> None:
    import ray

    check_reachable(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
    except Exception as exc:  # noqa: BLE001 - every failure to join is reported the same way
        raise LaunchError(f"could not join the Ray cluster at {address}: {type(exc).__name__}: {exc}") from None


def check_resources(ray_settings: RaySettings, gpus_from_cluster: bool) -> RaySettings:
    """GPUs (and custom resources) the replicas ask for must exist somewhere in the cluster."""
    import dataclasses

    import ray

    total = ray.cluster_resources()
    gpus = total.get("GPU", 0.0)
    if gpus_from_cluster:
        ray_settings = dataclasses.replace(ray_settings, num_gpus=1.0 if gpus else 0.0)
    if ray_settings.num_gpus > 0 and gpus < ray_settings.num_gpus:
        raise LaunchError(
            f"segmentation replicas need {ray_settings.num_gpus:g} GPU each but the cluster has {gpus:g}; "
            "add GPU nodes, or deploy with --device cpu"
        )
    for name, amount in ray_settings.replica_resources.items():
        if total.get(name, 0.0) < amount:
            raise LaunchError(f"replicas need resource {name}={amount:g}; the cluster has {total.get(name, 0.0):g}")
    return ray_settings


def application_status(name: str):
    from ray import serve

    return serve.status().applications.get(name)


def failure_reason(name: str) -> str:
    status = application_status(name)
    if status is None:
        return "the application disappeared"
    lines = [status.message] if status.message else []
    for deployment, info in status.deployments.items():
        if info.message and info.status not in ("HEALTHY",):
            lines.append(f"{deployment}: {info.message}")
    return "\n".join(lines) or str(status.status)


def deploy_and_wait(app, ray_settings: RaySettings, stop: threading.Event) -> bool:
    """Deploy; True once RUNNING, False if stopped first. Raises RuntimeError with the replicas' reason."""
    from ray import serve

    serve.run_many(
        [serve.RunTarget(app, name=ray_settings.app_name, route_prefix="/")],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )
    deadline = time.monotonic() + ray_settings.ready_timeout
    while not stop.wait(0.5):
        status = application_status(ray_settings.app_name)
        state = str(status.status) if status else "NOT_STARTED"
        if state.endswith("RUNNING"):
            return True
        if state.endswith("DEPLOY_FAILED"):
            raise RuntimeError(failure_reason(ray_settings.app_name))
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"not running after {ray_settings.ready_timeout:g} s: {failure_reason(ray_settings.app_name)}"
            )
    return False


def undeploy(app_name: str) -> None:
    """Delete our application; stop Serve (its proxy and controller) too when nothing else runs on it."""
    from ray import serve

    serve.delete(app_name)
    if not serve.status().applications:
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        settings, ray_settings, gpus_from_cluster = load(argv)
        address = ray_settings.address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise LaunchError("no cluster: pass --address HOST:PORT (or set RAY_ADDRESS)")
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        connect(address)
        ray_settings = check_resources(ray_settings, gpus_from_cluster)
    except (ConfigError, LaunchError) as exc:
        print(f"python -m service.ray: error: {exc}", file=sys.stderr)
        return 2

    from ray import serve

    from .app import build

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(proxy_location="HeadOnly", http_options={"host": settings.host, "port": settings.http_port})
    try:
        if deploy_and_wait(build(settings, ray_settings), ray_settings, stop):
            print(
                f"ready: {ray_settings.app_name} ({', '.join(settings.model_names())}) on "
                f"http://{settings.host}:{settings.http_port}",
                flush=True,
            )
            stop.wait()
        print("undeploying", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"python -m service.ray: deployment failed: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        undeploy(ray_settings.app_name)


if __name__ == "__main__":
    sys.exit(main())
