"""Ray Serve peer of `bisenet bench peers`: the engine in one replica behind `@serve.batch`.

    python -m service.bench.peers_ray --http-port 8123 --model bisenetv1_r18 --weights random \
        --device cpu --resize-scale 512x256 --max-batch 4 --warm-shape 256x512 --max-delay-ms 5

`POST /segment` takes an encoded image as the body and answers the label map as raw uint8 bytes with
`X-Height`/`X-Width`, as the service's `POST /segment?format=raw` does (400 for an undecodable image).
A single-node Ray of its own on 127.0.0.1, with its own temporary folder and no dashboard, so that it
never joins another Ray cluster on the machine; SIGTERM shuts it down.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import tempfile
import threading

from .peers_engine import EngineSpec, add_engine_args, decode, load_engine, segment_images, spec_from_args


def thread_env_vars(threads: int) -> dict:
    n = str(threads or os.environ.get("OMP_NUM_THREADS") or os.cpu_count())
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def build_app(spec: EngineSpec, max_delay_ms: float, max_ongoing: int):
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(
        num_replicas=1,
        max_ongoing_requests=max_ongoing,
        # num_cpus is placement only; Ray would set OMP_NUM_THREADS=1 in the replica: pass the engine's.
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": thread_env_vars(spec.threads)}},
    )
    class Segment:
        def __init__(self):
            self.engine = load_engine(spec)

        @serve.batch(max_batch_size=spec.max_batch, batch_wait_timeout_s=max_delay_ms / 1000)
        async def run(self, images: list) -> list:
            # In a thread so that the replica's event loop keeps decoding the next requests meanwhile.
            return await asyncio.to_thread(segment_images, self.engine, images)

        async def __call__(self, request: Request) -> Response:
            body = await request.body()
            try:
                image = await asyncio.to_thread(decode, body)
            except ValueError as exc:
                return Response(str(exc), status_code=400, media_type="text/plain")
            labels = await self.run(image)
            return Response(
                labels.tobytes(),
                media_type="application/octet-stream",
                headers={"X-Height": str(labels.shape[0]), "X-Width": str(labels.shape[1])},
            )

    return Segment.bind()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.bench.peers_ray", description=__doc__.split("\n\n")[0])
    add_engine_args(p)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--temp-dir", default=None, help="Ray's temporary folder (default: a new one under /tmp)")
    p.add_argument("--max-ongoing", type=int, default=64, help="requests a replica holds (the service's --max-queue)")
    args = p.parse_args(argv)
    spec = spec_from_args(args)

    # A fresh local node on loopback: never the cluster of RAY_ADDRESS or /tmp/ray's latest one.
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        os.environ.pop(key, None)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray import serve

    temp_dir = args.temp_dir or tempfile.mkdtemp(prefix="bisenet-ray-")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            _temp_dir=temp_dir,
            log_to_driver=False,
            configure_logging=False,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
        serve.run(build_app(spec, args.max_delay_ms, args.max_ongoing), name="bisenet", route_prefix="/segment")
        print("ray serve ready", flush=True)
        stop.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if not args.temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
