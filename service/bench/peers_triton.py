"""Triton peer of `bisenet bench peers`: a real Triton Inference Server (the one PyTriton bundles) with
dynamic batching, serving the engine through a Python infer function. Runs in .venv-peers (PyTriton pins
numpy < 2), built by tools/ensure_peers_venv.sh.

    .venv-peers/bin/python -m service.bench.peers_triton --http-port 8100 --grpc-port 8101 \
        --metrics-port 8102 --model bisenetv1_r18 --weights random --device cpu --max-batch 4

The model is named after --model and has the service's v2 tensors: inputs `IMAGE` (BYTES, dims [1],
one encoded image per batch item) or `RGB` (UINT8, dims [-1, -1, 3]), output `LABELS` (UINT8, dims
[-1, -1]); `max_batch_size` is --max-batch and the dynamic batcher waits at most --max-delay-ms.
Binds 127.0.0.1 only; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sysconfig
import threading

import numpy as np

from .peers_engine import add_engine_args, decode, load_engine, segment_images, spec_from_args


def make_infer(engine):
    """Triton's infer callable: a list of requests (each a dict of batched inputs) -> a list of outputs.

    Without PyTriton's @batch the requests of one dynamic batch stay separate, so images of different
    sizes can share a batch (one engine call per size, as the service's scheduler groups them)."""

    def infer(requests):
        images, counts = [], []
        for request in requests:
            if "RGB" in request.data:
                batch = [np.ascontiguousarray(x, dtype=np.uint8) for x in request.data["RGB"]]
            elif "IMAGE" in request.data:
                batch = [decode(bytes(item[0])) for item in request.data["IMAGE"]]
            else:
                raise ValueError("send IMAGE or RGB")
            images += batch
            counts.append(len(batch))
        labels = segment_images(engine, images)
        out, start = [], 0
        for n in counts:
            out.append({"LABELS": np.stack(labels[start : start + n])})
            start += n
        return out

    return infer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.bench.peers_triton", description=__doc__.split("\n\n")[0])
    add_engine_args(p)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--access-token", default=None, help="Triton's token for its protected endpoints")
    args = p.parse_args(argv)
    spec = spec_from_args(args)

    # The server's Python backend stub must load this interpreter's libpython, not Debian's system one
    # (which crashes it with "'_thread.RLock' object has no attribute '_recursion_count'").
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(v for v in (libdir, os.environ.get("LD_LIBRARY_PATH")) if v)

    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    engine = load_engine(spec)
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        allow_metrics=False,
        log_verbose=0,
    )
    security = TritonSecurityConfig(access_token=args.access_token) if args.access_token else None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=spec.model,
            infer_func=make_infer(engine),
            inputs=[
                Tensor(name="IMAGE", dtype=np.bytes_, shape=(1,), optional=True),
                Tensor(name="RGB", dtype=np.uint8, shape=(-1, -1, 3), optional=True),
            ],
            outputs=[Tensor(name="LABELS", dtype=np.uint8, shape=(-1, -1))],
            config=ModelConfig(
                max_batch_size=spec.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=int(args.max_delay_ms * 1000)),
            ),
            strict=True,
        )
        triton.run()
        print("triton ready", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
