"""OpenTelemetry tracing against a real OTLP/HTTP receiver on 127.0.0.1: the service's spans for
REST, gRPC, KServe v2 and stream frames, the caller's traceparent continued, the phases as children
in time order, sampling, refusals, and a collector that is down harming nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time

import grpc
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from service.bench.processes import free_port
from service.bench.trace_sink import attributes
from service.client import SegmentationError
from service.config import ConfigError, load_settings
from service.proto import segmentation_pb2 as pb
from service.proto import segmentation_pb2_grpc as pb_grpc
from service.tracing import Tracing
from tests.otlp import EXPORT_ENV, by_name, check_phases, traceparent
from tests.servicekit import FAST_ARGS, Service, png, wait_for

MODEL = "bisenetv1_r18"
SEGMENT_RPC = "bisenet.v1.Segmentation"


@pytest.fixture(scope="module")
def traced(receiver, tmp_path_factory):
    args = [*FAST_ARGS, "--model", f"{MODEL}=random", "--max-batch", "4", "--trace-endpoint", receiver.url]
    log_path = tmp_path_factory.mktemp("traced") / "service.log"
    svc = Service([*args, "--log-format", "json"], env=EXPORT_ENV, log_path=log_path).wait_ready()
    svc.log_path = log_path
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def image(photo) -> bytes:
    return png(photo[:96, :128])


def test_rest_request_continues_the_callers_trace_with_its_phases(receiver, traced, image):
    trace_id, caller, header = traceparent()
    r = httpx.post(f"{traced.url}/segment", content=image, headers={"content-type": "image/png", "traceparent": header})
    assert r.status_code == 200
    spans = receiver.trace(trace_id, 5)
    server = by_name(spans)["POST /segment"][0]
    assert server.parent_span_id == caller and server.kind == Span.SPAN_KIND_SERVER
    attrs = attributes(server.attributes)
    assert attrs["http.route"] == "/segment" and attrs["http.request.method"] == "POST"
    assert attrs["http.response.status_code"] == 200 and attrs["bisenet.model"] == MODEL
    assert server.status.code != Status.STATUS_CODE_ERROR
    check_phases(spans, server, MODEL)
    resource = next(res for res, span in receiver.spans if span.span_id == server.span_id)
    assert resource["service.name"] == "bisenet-serve"


def test_grpc_segment_continues_the_trace_in_its_metadata(receiver, traced, image):
    trace_id, caller, header = traceparent()
    with grpc.insecure_channel(traced.grpc_target) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        response = stub.Segment(pb.SegmentRequest(encoded=image), metadata=(("traceparent", header),), timeout=60)
    assert response.height == 96
    spans = receiver.trace(trace_id, 5)
    server = by_name(spans)[f"{SEGMENT_RPC}/Segment"][0]
    assert server.parent_span_id == caller
    attrs = attributes(server.attributes)
    assert attrs["rpc.system"] == "grpc" and attrs["rpc.method"] == "Segment" and attrs["rpc.grpc.status_code"] == 0
    check_phases(spans, server, MODEL)


def test_a_v2_request_of_two_images_has_the_phases_of_each(receiver, traced, photo):
    trace_id, caller, header = traceparent()
    images = [base64.b64encode(png(photo[:64, :96])).decode(), base64.b64encode(png(photo[64:128, :96])).decode()]
    body = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [2, 1], "data": images}]}
    r = httpx.post(
        f"{traced.url}/v2/models/{MODEL}/infer", content=json.dumps(body), headers={"traceparent": header}, timeout=60
    )
    assert r.status_code == 200, r.text
    spans = receiver.trace(trace_id, 1 + 2 * 3 + 1)
    server = by_name(spans)["POST /v2/models/{model}/infer"][0]
    assert server.parent_span_id == caller
    assert attributes(server.attributes)["http.route"] == "/v2/models/{model}/infer"
    check_phases(spans, server, MODEL, images=2)


def test_stream_frames_are_traces_of_their_own_linked_to_the_stream(receiver, traced, image):
    trace_id, caller, header = traceparent()
    with grpc.insecure_channel(traced.grpc_target) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        frames = (pb.SegmentRequest(encoded=image, frame_id=i) for i in range(3))
        replies = list(stub.StreamSegment(frames, metadata=(("traceparent", header), ("drop-policy", "block"))))
    assert [r.frame_id for r in replies] == [0, 1, 2] and not any(r.HasField("error") for r in replies)
    stream = receiver.trace(trace_id, 1)
    assert [s.name for s in stream] == [f"{SEGMENT_RPC}/StreamSegment"]
    assert stream[0].parent_span_id == caller and attributes(stream[0].attributes)["rpc.grpc.status_code"] == 0

    def linked() -> list[Span]:
        with receiver.lock:
            return [s for _, s in receiver.spans if any(link.span_id == stream[0].span_id for link in s.links)]

    wait_for(lambda: len(linked()) == 3, "three frame spans linked to the stream")
    frames = linked()
    assert {s.name for s in frames} == {f"{SEGMENT_RPC}/StreamSegment frame"}
    assert len({s.trace_id for s in frames}) == 3 and trace_id not in {s.trace_id for s in frames}
    for frame in frames:
        assert frame.links[0].trace_id == trace_id
        check_phases(receiver.trace(frame.trace_id, 5), frame, MODEL)


def test_json_log_lines_written_for_a_traced_request_name_its_trace(receiver, traced, image):
    """The front end's debug line for a stream (debug turned on through /v2/logging) carries the
    stream span's trace and span ids, so a log collector can join it to the trace."""
    assert httpx.post(f"{traced.url}/v2/logging", json={"log_verbose_level": 1}).status_code == 200
    try:
        trace_id, _, header = traceparent()
        with grpc.insecure_channel(traced.grpc_target) as channel:
            stub = pb_grpc.SegmentationStub(channel)
            frames = iter([pb.SegmentRequest(encoded=image)])
            assert len(list(stub.StreamSegment(frames, metadata=(("traceparent", header),)))) == 1
        (stream,) = receiver.trace(trace_id, 1)

        def stream_lines() -> list[dict]:
            lines = (json.loads(line) for line in traced.log_path.read_text().splitlines() if line.startswith("{"))
            return [line for line in lines if line["message"].startswith("stream: model")]

        wait_for(lambda: any(line.get("trace_id") == trace_id.hex() for line in stream_lines()), "the stream's line")
        (line,) = [line for line in stream_lines() if line.get("trace_id") == trace_id.hex()]
        assert line["span_id"] == stream.span_id.hex() and line["level"] == "debug"
        lines = [json.loads(line) for line in traced.log_path.read_text().splitlines() if line.startswith("{")]
        assert not [line for line in lines if line["logger"].startswith("urllib3")]  # no line per export
    finally:
        assert httpx.post(f"{traced.url}/v2/logging", json={"log_verbose_level": 0}).status_code == 200
    untraced = [line for line in stream_lines() if "trace_id" not in line]
    assert not untraced  # every stream here was traced (rate 1)


def test_a_traced_requests_latency_bucket_links_to_its_trace(receiver, traced, image):
    trace_id, _, header = traceparent()
    r = httpx.post(f"{traced.url}/segment", content=image, headers={"content-type": "image/png", "traceparent": header})
    assert r.status_code == 200
    openmetrics = httpx.get(f"{traced.url}/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")
    (bucket,) = [
        line
        for line in openmetrics.text.splitlines()
        if line.startswith("seg_request_duration_seconds_bucket{") and f'trace_id="{trace_id.hex()}"' in line
    ]
    assert 'model="bisenetv1_r18"' in bucket and 'protocol="http"' in bucket and 'code="200"' in bucket
    plain = httpx.get(f"{traced.url}/metrics")  # what scrapers that do not ask for OpenMetrics get
    assert plain.headers["content-type"].startswith("text/plain") and "trace_id" not in plain.text


def test_a_refused_request_says_why_and_a_client_error_is_not_a_server_error(receiver, traced):
    trace_id, _, header = traceparent()
    r = httpx.post(
        f"{traced.url}/segment",
        content=b"\x89PNG not really",
        headers={"content-type": "image/png", "traceparent": header},
    )
    assert r.status_code == 400
    (server,) = receiver.trace(trace_id, 1)
    attrs = attributes(server.attributes)
    assert attrs["http.response.status_code"] == 400 and attrs["error.type"] == "invalid_image"
    assert server.status.code == Status.STATUS_CODE_UNSET  # 4xx: the caller's fault (OpenTelemetry's HTTP rules)
    (event,) = server.events
    assert event.name == "refused" and attributes(event.attributes)["bisenet.error.code"] == "invalid_image"

    trace_id, _, header = traceparent()
    with grpc.insecure_channel(traced.grpc_target) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Segment(pb.SegmentRequest(encoded=b"junk", model="nope"), metadata=(("traceparent", header),))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    (server,) = receiver.trace(trace_id, 1)
    assert attributes(server.attributes)["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert attributes(server.attributes)["error.type"] == "not_found"


def test_an_unsampled_caller_is_not_traced(receiver, traced, image):
    trace_id, _, header = traceparent(sampled=False)
    r = httpx.post(f"{traced.url}/segment", content=image, headers={"content-type": "image/png", "traceparent": header})
    assert r.status_code == 200
    marker, _, marked = traceparent()  # a later traced request: once it is in, the first would be too
    httpx.post(f"{traced.url}/segment", content=image, headers={"content-type": "image/png", "traceparent": marked})
    receiver.trace(marker, 5)
    assert receiver.of_trace(trace_id) == []


def test_rate_zero_traces_only_callers_that_ask(receiver, image):
    args = [*FAST_ARGS, "--model", f"{MODEL}=random", "--trace-endpoint", receiver.url, "--trace-rate", "0"]
    svc = Service(args, env=EXPORT_ENV).wait_ready()
    try:
        before = len(receiver.spans)
        for _ in range(3):
            r = httpx.post(f"{svc.url}/segment", content=image, headers={"content-type": "image/png"})
            assert r.status_code == 200
        trace_id, caller, header = traceparent()
        headers = {"content-type": "image/png", "traceparent": header}
        assert httpx.post(f"{svc.url}/segment", content=image, headers=headers).status_code == 200
        spans = receiver.trace(trace_id, 5)
        assert by_name(spans)["POST /segment"][0].parent_span_id == caller
        with receiver.lock:
            new = receiver.spans[before:]
        assert {span.trace_id for _, span in new} == {trace_id}  # the three without a traceparent: none
    finally:
        svc.stop()


def test_a_collector_that_is_down_harms_nothing(image):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = [*FAST_ARGS, "--model", f"{MODEL}=random", "--trace-endpoint", down, "--drain-seconds", "5"]
    svc = Service(args, env=EXPORT_ENV).wait_ready()
    try:
        for _ in range(5):
            r = httpx.post(f"{svc.url}/segment", content=image, headers={"content-type": "image/png"})
            assert r.status_code == 200
        time.sleep(0.5)  # an export has failed by now
        assert httpx.get(f"{svc.url}/readyz").status_code == 200
    finally:
        started = time.monotonic()
        code = svc.stop()
    assert code == 0 and time.monotonic() - started < 20  # the unsent spans hold up the exit 5 s at most


def test_trace_settings_are_checked_at_start():
    assert load_settings([]).trace_endpoint is None
    assert load_settings(["--trace-endpoint", "http://jaeger:4318"]).trace_endpoint == "http://jaeger:4318/v1/traces"
    assert load_settings(["--trace-endpoint", "https://c/otlp/v1/traces"]).trace_endpoint == "https://c/otlp/v1/traces"
    for bad, message in (
        (["--trace-endpoint", "jaeger:4318"], "expected an OTLP/HTTP URL"),
        (["--trace-endpoint", "grpc://jaeger:4317"], "expected an OTLP/HTTP URL"),
        (["--trace-endpoint", "http://jaeger:port"], "port is not a number"),
        (["--trace-rate", "1.5"], "must be at most 1"),
        (["--trace-rate", "-1"], "must be at least 0"),
        (["--trace-rate", "half"], "expected a float"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_settings(bad)


def test_opentelemetrys_own_variables_set_the_endpoint_below_the_services(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert load_settings([]).trace_endpoint == "http://collector:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:4318/custom/traces")
    assert load_settings([]).trace_endpoint == "http://collector:4318/custom/traces"
    monkeypatch.setenv("BISENET_TRACE_ENDPOINT", "http://mine:4318")
    assert load_settings([]).trace_endpoint == "http://mine:4318/v1/traces"
    assert load_settings(["--trace-endpoint", ""]).trace_endpoint is None  # off, whatever the environment says


def test_without_an_endpoint_spans_record_nothing():
    tracing = Tracing()
    assert tracing.provider is None
    with tracing.request("POST /segment", {}, {}):
        assert not trace.get_current_span().is_recording()
        tracing.outcome("200", MODEL, "http")  # nothing to annotate, and no error
        tracing.phases([], 0.001)
    tracing.shutdown()


def test_the_python_clients_send_the_callers_trace_context(receiver, traced, photo):
    """A program that traces (here: a span context made current by hand) and calls the service with
    its clients gets the service's spans in its own trace: REST, asyncio REST and gRPC."""
    from service.client import AsyncSegmentationClient, GrpcSegmentationClient, SegmentationClient

    frame = photo[:64, :96]

    def blocking(client):
        with client:
            return client.segment(frame)

    async def awaited(client):
        async with client:
            return await client.segment(frame)

    calls = {
        "POST /segment": lambda: blocking(SegmentationClient(traced.url)),
        f"{SEGMENT_RPC}/Segment": lambda: blocking(GrpcSegmentationClient(traced.grpc_target)),
        "POST /segment (asyncio)": lambda: asyncio.run(awaited(AsyncSegmentationClient(traced.url))),
    }
    for name, call in calls.items():
        trace_id, span_id = secrets.token_bytes(16), secrets.token_bytes(8)
        caller = trace.SpanContext(
            int.from_bytes(trace_id), int.from_bytes(span_id), is_remote=False, trace_flags=trace.TraceFlags(1)
        )
        with trace.use_span(trace.NonRecordingSpan(caller)):
            assert call().labels.shape == (64, 96)
        server = by_name(receiver.trace(trace_id, 5))[name.removesuffix(" (asyncio)")][0]
        assert server.parent_span_id == span_id, name


def test_a_traced_answer_names_its_trace_for_clients_that_do_not_trace(receiver, traced, image, photo):
    """`traceresponse` (header, gRPC trailer) on answers the service traced, errors included; the
    Python clients read it into `trace_id`. An unsampled request's answer names nothing."""
    from service.client import AsyncGrpcSegmentationClient, GrpcSegmentationClient, SegmentationClient

    r = httpx.post(f"{traced.url}/segment", content=image, headers={"content-type": "image/png"})
    _, trace_hex, span_hex, flags = r.headers["traceresponse"].split("-")
    server = by_name(receiver.trace(bytes.fromhex(trace_hex), 5))["POST /segment"][0]
    assert server.span_id.hex() == span_hex and flags == "01"
    refused = httpx.post(f"{traced.url}/segment", content=b"junk", headers={"content-type": "image/png"})
    assert refused.status_code == 400 and "traceresponse" in refused.headers

    _, _, unsampled = traceparent(sampled=False)
    headers = {"content-type": "image/png", "traceparent": unsampled}
    assert "traceresponse" not in httpx.post(f"{traced.url}/segment", content=image, headers=headers).headers

    frame = photo[:64, :96]
    with SegmentationClient(traced.url) as client:
        rest_id = client.segment(frame).trace_id
        with pytest.raises(SegmentationError) as error:
            client.segment(frame, model="nope")
        assert error.value.status == 404 and len(error.value.trace_id) == 32
    with GrpcSegmentationClient(traced.grpc_target) as client:
        grpc_id = client.segment(frame).trace_id
        with pytest.raises(SegmentationError) as error:
            client.segment(frame, model="nope")
        assert len(error.value.trace_id) == 32

    async def awaited():
        async with AsyncGrpcSegmentationClient(traced.grpc_target) as client:
            return (await client.segment(frame)).trace_id

    async_id = asyncio.run(awaited())
    for trace_id, name in ((rest_id, "POST /segment"), (grpc_id, f"{SEGMENT_RPC}/Segment"), (async_id, None)):
        spans = receiver.trace(bytes.fromhex(trace_id), 5)
        assert name is None or name in by_name(spans)
