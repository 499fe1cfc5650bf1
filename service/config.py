"""Service settings: command-line flags, each with a BISENET_* environment variable as default."""

from __future__ import annotations

import argparse
import os
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field

from model.graph_policy import validate_buckets
from model.zoo import ARCHS, ZOO

from .worker.scheduler import POLICIES as BATCHING_POLICIES
from .worker.scheduler import PRIORITY_BATCHES

ALIASES = {"fast": "bisenetv1_r18", "accurate": "bisenetv1_r50"}


MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ConfigError(ValueError):
    """A setting is malformed or names something that does not exist."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what clients ask for
    weights: str | None  # None: the zoo default for `name`; 'random'; a zoo entry, path or URL


@dataclass(frozen=True)
class Settings:
    models: tuple[ModelSpec, ...] = (ModelSpec("bisenetv1_r18", None), ModelSpec("bisenetv1_r50", None))
    devices: tuple[str, ...] = ("auto",)
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 50051
    max_batch: int = 8
    max_delay_ms: float = 5.0
    batching: str = "wait"  # wait | adaptive | greedy (worker/scheduler.py)
    decode: str = "auto"  # frontend | worker | auto (worker on CUDA, frontend on CPU)
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8)
    warm_shapes: tuple[tuple[int, int], ...] = ((1024, 2048),)
    lazy_capture_shapes: int = 4  # shapes beyond the warm ones that may get CUDA graphs
    lazy_capture_pixels: int = 1024 * 2048  # H * W above which a shape never gets lazy graphs
    resize_scale: tuple[int, int] = (2048, 1024)
    target_fps: float = 30.0
    max_queue: int = 64
    priority_levels: int = 2  # requests say priority 1 (the default, first) .. this
    priority_batches: str = "separate"  # separate | shared (worker/scheduler.py)
    max_image_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    shm_bytes: int = 1 << 30
    dtype: str = "auto"
    cpu_threads: int = 0  # intra-op threads of each CPU worker; 0: torch's default (one per core)
    api_key: str | None = None
    drain_seconds: float = 30.0
    log_level: str = "info"
    log_format: str = "text"  # or json: one object per line, for log collectors
    decode_threads: int = field(default_factory=lambda: max(2, min(8, os.cpu_count() or 2)))
    tls_cert: str | None = None
    tls_key: str | None = None
    stream_idle_seconds: float = 300.0  # a gRPC stream with no frame for this long is ended (0: never)
    auto_order: tuple[tuple[str, str], ...] = ()  # (model, tta) for model=auto, most accurate first
    auto_upgrade_frames: int = 10  # frames with headroom before an auto stream steps up
    trace_endpoint: str | None = None  # OTLP/HTTP URL for OpenTelemetry traces; None: no tracing
    trace_rate: float = 1.0  # share of requests without a caller's traceparent that are traced

    @property
    def budget_seconds(self) -> float:
        return 1.0 / self.target_fps

    def model_names(self) -> list[str]:
        return [m.name for m in self.models]


def parse_models(values: list[str]) -> tuple[ModelSpec, ...]:
    specs = []
    for value in values:
        for item in filter(None, (v.strip() for v in value.split(","))):
            name, _, weights = item.partition("=")
            name = ALIASES.get(name, name)
            custom = weights and weights != "random" and weights not in ZOO  # a checkpoint file or URL
            if name not in ARCHS and name not in ZOO and not custom:
                raise ConfigError(
                    f"unknown model {name!r} in --model {item!r}; known: "
                    f"{', '.join(list(ARCHS) + list(ZOO))} (aliases: fast, accurate), or "
                    f"NAME=CHECKPOINT for a checkpoint of your own"
                )
            if name == "auto":
                raise ConfigError("'auto' is reserved (model=auto picks a served model); name the model otherwise")
            if not MODEL_NAME.fullmatch(name):
                raise ConfigError(f"bad model name {name!r}: use letters, digits, '_', '-' and '.'")
            specs.append(ModelSpec(name, weights or None))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"a model is named twice: {names}")
    if not specs:
        raise ConfigError("no model configured")
    return tuple(specs)


def parse_shape(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"bad shape {text!r}: expected HEIGHTxWIDTH, e.g. 1024x2048") from None
    if h <= 0 or w <= 0:
        raise ConfigError(f"bad shape {text!r}: sides must be positive")
    return h, w


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise ConfigError(f"bad {what} {text!r}: expected comma-separated integers") from None
    if not values or values[0] <= 0:
        raise ConfigError(f"bad {what} {text!r}: expected positive integers")
    return values


def _env(name: str, default):
    return os.environ.get(f"BISENET_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(prog="bisenet serve", description="BiSeNetV1 segmentation service (REST + gRPC)")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="NAME[=WEIGHTS]",
        help="model to serve (repeatable or comma-separated); WEIGHTS is a zoo entry, path, URL or "
        "'random' [BISENET_MODELS; default bisenetv1_r18,bisenetv1_r50 with official weights]",
    )
    p.add_argument(
        "--device",
        default=_env("DEVICE", "auto"),
        help="auto|cpu|cuda|cuda:N[,cuda:M...]: one worker per device [BISENET_DEVICE]",
    )
    p.add_argument("--host", default=_env("HOST", d.host), help="bind address [BISENET_HOST]")
    p.add_argument("--http-port", default=_env("HTTP_PORT", d.http_port), help="[BISENET_HTTP_PORT]")
    p.add_argument("--grpc-port", default=_env("GRPC_PORT", d.grpc_port), help="0 disables gRPC [BISENET_GRPC_PORT]")
    p.add_argument("--max-batch", default=_env("MAX_BATCH", d.max_batch), help="[BISENET_MAX_BATCH]")
    p.add_argument(
        "--max-delay-ms",
        default=_env("MAX_DELAY_MS", d.max_delay_ms),
        help="longest wait to fill a batch [BISENET_MAX_DELAY_MS]",
    )
    p.add_argument(
        "--batching",
        default=_env("BATCHING", d.batching),
        help="wait: a batch waits up to --max-delay-ms to fill; adaptive: the same, but only while the "
        "front end is still decoding requests that could join it; greedy: an idle worker runs what is "
        "queued at once, batches form while it is busy [BISENET_BATCHING]",
    )
    p.add_argument(
        "--decode",
        default=_env("DECODE", d.decode),
        help="where images are decoded: frontend, worker (the front end reads only headers; JPEGs are "
        "decoded on the GPU with nvJPEG), or auto (worker on CUDA, frontend on CPU) [BISENET_DECODE]",
    )
    p.add_argument(
        "--batch-buckets",
        default=_env("BATCH_BUCKETS", None),
        help="CUDA-graph batch sizes, e.g. 1,2,4,8 (default: powers of 2 up to --max-batch) [BISENET_BATCH_BUCKETS]",
    )
    p.add_argument(
        "--warm-shapes",
        default=_env("WARM_SHAPES", "1024x2048"),
        help="HxW shapes captured/warmed before ready, comma-separated; 'none' for none [BISENET_WARM_SHAPES]",
    )
    p.add_argument(
        "--lazy-capture-shapes",
        default=_env("LAZY_CAPTURE_SHAPES", d.lazy_capture_shapes),
        help="CUDA graphs for at most this many non-warm shapes, captured while idle; 0: none "
        "[BISENET_LAZY_CAPTURE_SHAPES]",
    )
    p.add_argument(
        "--lazy-capture-pixels",
        default=_env("LAZY_CAPTURE_PIXELS", d.lazy_capture_pixels),
        help="largest H*W of a lazily captured shape [BISENET_LAZY_CAPTURE_PIXELS]",
    )
    p.add_argument(
        "--resize-scale",
        default=_env("RESIZE_SCALE", "2048x1024"),
        help="test-time resize as mmseg's Resize(scale): long edge to at most the larger number, short "
        "edge to at most the smaller (keep the default for the Cityscapes models) "
        "[BISENET_RESIZE_SCALE]",
    )
    p.add_argument(
        "--target-fps",
        default=_env("TARGET_FPS", d.target_fps),
        help="real-time target; the frame budget is 1/fps [BISENET_TARGET_FPS]",
    )
    p.add_argument(
        "--max-queue",
        default=_env("MAX_QUEUE", d.max_queue),
        help="requests waiting per model before 429; lower priorities may fill only part of it (priority 2 "
        "of 2: half) [BISENET_MAX_QUEUE]",
    )
    p.add_argument(
        "--priority-levels",
        default=_env("PRIORITY_LEVELS", d.priority_levels),
        help="priorities a request may ask for, 1 (the default) runs first; 1 turns priorities off "
        "[BISENET_PRIORITY_LEVELS]",
    )
    p.add_argument(
        "--priority-batches",
        default=_env("PRIORITY_BATCHES", d.priority_batches),
        help="separate: a batch holds one priority, so high-priority requests never compute beside lower "
        "ones; shared: lower priorities fill the room left in a batch (as Triton) [BISENET_PRIORITY_BATCHES]",
    )
    p.add_argument(
        "--max-image-bytes",
        default=_env("MAX_IMAGE_BYTES", d.max_image_bytes),
        help="largest upload, bytes [BISENET_MAX_IMAGE_BYTES]",
    )
    p.add_argument(
        "--max-pixels",
        default=_env("MAX_PIXELS", d.max_pixels),
        help="largest decoded image, pixels [BISENET_MAX_PIXELS]",
    )
    p.add_argument(
        "--shm-bytes",
        default=_env("SHM_BYTES", d.shm_bytes),
        help="cap on shared memory for frames in flight; size /dev/shm above it [BISENET_SHM_BYTES]",
    )
    p.add_argument("--dtype", default=_env("DTYPE", d.dtype), help="auto|float32|float16|bfloat16 [BISENET_DTYPE]")
    p.add_argument(
        "--cpu-threads",
        default=_env("CPU_THREADS", d.cpu_threads),
        help="threads each CPU worker computes with (OpenMP/MKL); 0: one per core [BISENET_CPU_THREADS]",
    )
    p.add_argument(
        "--api-key",
        default=_env("API_KEY", None),
        help="require this key (X-API-Key / Bearer / gRPC x-api-key) [BISENET_API_KEY]",
    )
    p.add_argument(
        "--drain-seconds",
        default=_env("DRAIN_SECONDS", d.drain_seconds),
        help="SIGTERM grace period for in-flight work [BISENET_DRAIN_SECONDS]",
    )
    p.add_argument("--log-level", default=_env("LOG_LEVEL", d.log_level), help="[BISENET_LOG_LEVEL]")
    p.add_argument(
        "--log-format",
        default=_env("LOG_FORMAT", d.log_format),
        help="text, or json (one object per line) for log collectors [BISENET_LOG_FORMAT]",
    )
    p.add_argument("--tls-cert", default=_env("TLS_CERT", None), help="PEM certificate for gRPC TLS [BISENET_TLS_CERT]")
    p.add_argument("--tls-key", default=_env("TLS_KEY", None), help="PEM key for gRPC TLS [BISENET_TLS_KEY]")
    p.add_argument(
        "--stream-idle-seconds",
        default=_env("STREAM_IDLE_SECONDS", d.stream_idle_seconds),
        help="end a gRPC stream that sends no frame for this long; 0: never [BISENET_STREAM_IDLE_SECONDS]",
    )
    p.add_argument(
        "--auto-order",
        default=_env("AUTO_ORDER", ""),
        help="modes model=auto/tta=auto choose from, most accurate first, as MODEL[:TTA],... (TTA none, "
        "flip or ms_flip); default: by published mIoU [BISENET_AUTO_ORDER]",
    )
    p.add_argument(
        "--auto-upgrade-frames",
        default=_env("AUTO_UPGRADE_FRAMES", d.auto_upgrade_frames),
        help="frames in a row with headroom before an auto stream steps up to a more accurate mode "
        "[BISENET_AUTO_UPGRADE_FRAMES]",
    )
    p.add_argument(
        "--trace-endpoint",
        default=_env("TRACE_ENDPOINT", otlp_endpoint_from_environment()),
        help="send OpenTelemetry traces (OTLP over HTTP) to this URL, e.g. http://jaeger:4318 (/v1/traces "
        "is added to a URL without a path); empty: no tracing [BISENET_TRACE_ENDPOINT, else "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT]",
    )
    p.add_argument(
        "--trace-rate",
        default=_env("TRACE_RATE", d.trace_rate),
        help="share of requests traced, 0-1, when the caller sends no traceparent (a caller's sampled "
        "flag always decides) [BISENET_TRACE_RATE]",
    )
    return p


def otlp_endpoint_from_environment() -> str:
    """OpenTelemetry's own variables, as an OpenTelemetry operator or a platform sets them: the traces
    URL as it is, or the collector's base URL (which gets /v1/traces)."""
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")


def parse_trace_endpoint(text: str) -> str | None:
    """An OTLP/HTTP traces URL, or None (tracing off); a bare collector address gets /v1/traces."""
    text = text.strip()
    if not text:
        return None
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            f"bad --trace-endpoint {text!r}: expected an OTLP/HTTP URL, http(s)://HOST[:PORT][/v1/traces]"
        )
    try:
        url.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigError(f"bad --trace-endpoint {text!r}: the port is not a number") from None
    return text if url.path not in ("", "/") else urllib.parse.urlunsplit(url._replace(path="/v1/traces"))


def parse_auto_order(text: str, models: tuple[ModelSpec, ...]) -> tuple[tuple[str, str], ...]:
    """`MODEL[:TTA],...` -> ((model, tta), ...), each model served and each tta known."""
    from model.tta import TTA_MODES

    served = [m.name for m in models]
    order = []
    for item in filter(None, (v.strip() for v in text.split(","))):
        name, _, tta = item.partition(":")
        name, tta = ALIASES.get(name, name) if name not in served else name, tta or "none"
        if name not in served:
            raise ConfigError(f"--auto-order {item!r}: {name!r} is not served; served: {', '.join(served)}")
        if tta not in TTA_MODES:
            raise ConfigError(f"--auto-order {item!r}: unknown tta {tta!r}; choose {', '.join(TTA_MODES)}")
        if (name, tta) in order:
            raise ConfigError(f"--auto-order names {item!r} twice")
        order.append((name, tta))
    return tuple(order)


def _number(value, name: str, kind=int, minimum=None, maximum=None):
    flag = f"--{name} (BISENET_{name.upper().replace('-', '_')})"
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"bad {flag} {value!r}: expected a {kind.__name__}") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"bad {flag} {value!r}: must be at least {minimum}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"bad {flag} {value!r}: must be at most {maximum}")
    return number


def parse_devices(text: str) -> tuple[str, ...]:
    devices = tuple(d.strip() for d in text.split(",") if d.strip())
    for d in devices:
        if d not in ("auto", "cpu", "cuda") and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise ConfigError(f"bad --device {text!r}: use auto, cpu, cuda or cuda:N[,cuda:M]")
    if not devices or ("auto" in devices and len(devices) > 1):
        raise ConfigError(f"bad --device {text!r}")
    return devices


def check_tls_files(cert: str, key: str) -> None:
    """Both PEM files readable and a matching pair, so a bad one stops start-up in one line."""
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not os.path.isfile(path):
            raise ConfigError(f"bad {flag} {path!r}: no such file")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"bad {flag} {path!r}: not readable")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        reason = exc.reason or exc.strerror or "unreadable PEM"
        raise ConfigError(
            f"bad --tls-cert {cert!r} / --tls-key {key!r}: {reason.lower().replace('_', ' ')} "
            "(expected a PEM certificate and its private key)"
        ) from None


def load_settings(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    models = parse_models(args.model or [_env("MODELS", "bisenetv1_r18,bisenetv1_r50")])
    max_batch = _number(args.max_batch, "max-batch", minimum=1)
    if args.batch_buckets:
        buckets = _int_list(args.batch_buckets, "--batch-buckets")
    else:
        buckets = tuple(b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_batch) + (max_batch,)
    try:
        buckets = validate_buckets(buckets, max_batch)
    except ValueError as exc:
        raise ConfigError(f"--batch-buckets: {exc} (--max-batch {max_batch})") from None
    warm = args.warm_shapes.strip().lower()
    warm_shapes = () if warm in ("", "none") else tuple(parse_shape(s) for s in warm.split(","))
    if args.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"bad --log-level {args.log_level!r}")
    if args.dtype not in ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16"):
        raise ConfigError(f"bad --dtype {args.dtype!r}: use auto, float32, float16 or bfloat16")
    if args.log_format.lower() not in ("text", "json"):
        raise ConfigError(f"bad --log-format {args.log_format!r}: use text or json")
    if args.batching not in BATCHING_POLICIES:
        raise ConfigError(f"bad --batching {args.batching!r}: use {', '.join(BATCHING_POLICIES)}")
    if args.priority_batches not in PRIORITY_BATCHES:
        raise ConfigError(f"bad --priority-batches {args.priority_batches!r}: use {', '.join(PRIORITY_BATCHES)}")
    if args.decode not in ("auto", "frontend", "worker"):
        raise ConfigError(f"bad --decode {args.decode!r}: use auto, frontend or worker")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.tls_cert:
        check_tls_files(args.tls_cert, args.tls_key)
    return Settings(
        models=models,
        devices=parse_devices(args.device),
        host=args.host,
        http_port=_number(args.http_port, "http-port", minimum=0),
        grpc_port=_number(args.grpc_port, "grpc-port", minimum=0),
        max_batch=max_batch,
        max_delay_ms=_number(args.max_delay_ms, "max-delay-ms", float, minimum=0),
        batching=args.batching,
        decode=args.decode,
        batch_buckets=buckets,
        warm_shapes=warm_shapes,
        lazy_capture_shapes=_number(args.lazy_capture_shapes, "lazy-capture-shapes", minimum=0),
        lazy_capture_pixels=_number(args.lazy_capture_pixels, "lazy-capture-pixels", minimum=1),
        resize_scale=parse_shape(args.resize_scale),
        target_fps=_number(args.target_fps, "target-fps", float, minimum=0.1),
        max_queue=_number(args.max_queue, "max-queue", minimum=1),
        priority_levels=_number(args.priority_levels, "priority-levels", minimum=1),
        priority_batches=args.priority_batches,
        max_image_bytes=_number(args.max_image_bytes, "max-image-bytes", minimum=1),
        max_pixels=_number(args.max_pixels, "max-pixels", minimum=1),
        shm_bytes=_number(args.shm_bytes, "shm-bytes", minimum=1 << 20),
        dtype=args.dtype,
        cpu_threads=_number(args.cpu_threads, "cpu-threads", minimum=0),
        api_key=args.api_key or None,
        drain_seconds=_number(args.drain_seconds, "drain-seconds", float, minimum=0),
        log_level=args.log_level.lower(),
        log_format=args.log_format.lower(),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        stream_idle_seconds=_number(args.stream_idle_seconds, "stream-idle-seconds", float, minimum=0),
        auto_order=parse_auto_order(args.auto_order, models),
        auto_upgrade_frames=_number(args.auto_upgrade_frames, "auto-upgrade-frames", minimum=1),
        trace_endpoint=parse_trace_endpoint(args.trace_endpoint),
        trace_rate=_number(args.trace_rate, "trace-rate", float, minimum=0, maximum=1),
    )
