"""Triton's logging extension against the real service with Triton's own clients: the settings read
over HTTP and gRPC, debug lines turned on and off while it runs (in the front end and in the worker,
a restarted worker included), and the settings it refuses."""

from __future__ import annotations

import logging
import os
import re
import signal

import grpc
import httpx
import pytest

from service.client import GrpcSegmentationClient, SegmentationClient
from tests.servicekit import FAST_ARGS, Service, wait_for

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

KEY = "logging-key"
HEADERS = {"x-api-key": KEY}
BATCH_LINE = re.compile(r"DEBUG service\.worker\[(\d+)\]: batch of 1: bisenetv1_r18, tta none, 64x96")


@pytest.fixture(scope="module")
def service(r18_checkpoint, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logging") / "service.log"
    svc = Service(
        [*FAST_ARGS, "--model", f"bisenetv1_r18={r18_checkpoint}", "--log-level", "info", "--api-key", KEY],
        log_path=log_path,
    )
    svc.log_path = log_path
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def clients(service):
    http = httpclient.InferenceServerClient(service.url.removeprefix("http://"))
    grpc_ = grpcclient.InferenceServerClient(service.grpc_target)
    yield http, grpc_
    http.close()
    grpc_.close()


def log_text(service) -> str:
    return service.log_path.read_text(errors="replace")


def segment(service, photo) -> None:
    with SegmentationClient(service.url, api_key=KEY) as client:
        assert client.segment(photo[:64, :96]).labels.shape == (64, 96)


def test_the_settings_read_alike_over_http_and_grpc(clients):
    http, grpc_ = clients
    expected = {
        "log_file": "",
        "log_info": True,
        "log_warning": True,
        "log_error": True,
        "log_verbose_level": 0,
        "log_format": "text",
    }
    assert http.get_log_settings(headers=HEADERS) == expected
    over_grpc = grpc_.get_log_settings(headers=HEADERS, as_json=True)["settings"]
    got = {key: next(iter(value.values()), None) for key, value in over_grpc.items()}
    assert got == expected
    assert "logging" in http.get_server_metadata()["extensions"]


def test_debug_lines_turn_on_and_off_while_the_service_runs(service, clients, photo):
    http, grpc_ = clients
    segment(service, photo)
    assert not BATCH_LINE.search(log_text(service))  # info: no debug lines

    assert http.update_log_settings({"log_verbose_level": 1}, headers=HEADERS)["log_verbose_level"] == 1
    segment(service, photo)
    wait_for(lambda: BATCH_LINE.search(log_text(service)), "the worker's debug line for the batch")
    with GrpcSegmentationClient(service.grpc_target, api_key=KEY) as client:
        list(client.stream([photo[:64, :96]], policy="block"))
    wait_for(lambda: "DEBUG service.grpc" in log_text(service), "the front end's debug line for the stream")
    assert "log level changed from info to debug" in log_text(service)

    # A worker that dies and is restarted starts at the level set at run time.
    (old_pid,) = {int(pid) for pid in BATCH_LINE.findall(log_text(service))}
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: service.worker_pids() and service.worker_pids() != [old_pid], "a new worker", 60)
    wait_for(lambda: httpx.get(f"{service.url}/readyz").status_code == 200, "ready again", 120)
    segment(service, photo)
    wait_for(lambda: len({int(p) for p in BATCH_LINE.findall(log_text(service))}) == 2, "the new worker's debug line")

    response = grpc_.update_log_settings({"log_verbose_level": 0}, headers=HEADERS, as_json=True)
    assert response["settings"]["log_verbose_level"] == {"uint32_param": 0}
    before = len(BATCH_LINE.findall(log_text(service)))
    segment(service, photo)
    segment(service, photo)
    assert len(BATCH_LINE.findall(log_text(service))) == before


def test_switches_map_onto_one_level(clients):
    http, _ = clients
    try:
        quiet = http.update_log_settings({"log_info": False}, headers=HEADERS)
        assert (quiet["log_info"], quiet["log_warning"], quiet["log_error"]) == (False, True, True)
        quieter = http.update_log_settings({"log_warning": False}, headers=HEADERS)
        assert (quieter["log_info"], quieter["log_warning"], quieter["log_error"]) == (False, False, True)
    finally:
        assert http.update_log_settings({"log_info": True}, headers=HEADERS)["log_info"] is True


@pytest.mark.parametrize(
    ("settings", "message", "grpc_too"),
    [
        ({"log_file": "/tmp/triton.log"}, "log_file cannot be set", True),
        ({"log_format": "ISO8601"}, "log_format is set at start", True),
        ({"log_verbose": 1}, "unknown log setting 'log_verbose'", True),
        ({"log_info": "yes"}, "log_info must be true or false", False),  # tritonclient's gRPC sends only bools
    ],
)
def test_settings_that_cannot_be_changed_are_refused(clients, settings, message, grpc_too):
    http, grpc_ = clients
    with pytest.raises(InferenceServerException, match=message) as over_http:
        http.update_log_settings(settings, headers=HEADERS)
    assert over_http.value.status() == "422"
    if grpc_too:
        with pytest.raises(InferenceServerException, match=message) as over_grpc:
            grpc_.update_log_settings(settings, headers=HEADERS)
        assert over_grpc.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert http.get_log_settings(headers=HEADERS)["log_info"] is True  # nothing changed


def test_the_settings_need_the_api_key(service, clients):
    http, grpc_ = clients
    with pytest.raises(InferenceServerException) as over_http:
        http.update_log_settings({"log_verbose_level": 1})
    assert over_http.value.status() == "401"
    with pytest.raises(InferenceServerException) as over_grpc:
        grpc_.get_log_settings()
    assert over_grpc.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
    assert http.get_log_settings(headers=HEADERS)["log_verbose_level"] == 0


def test_in_process_settings_refuse_bad_values():
    from service.errors import ServiceError
    from service.log_settings import LogSettings, level_of, settings_of

    for level in ("debug", "info", "warning", "error", "critical"):
        assert level_of(settings_of(getattr(logging, level.upper()))) == level
    settings = LogSettings("json")
    for bad in ({"log_verbose_level": -1}, {"log_verbose_level": True}, {"log_error": 1}):
        with pytest.raises(ServiceError):
            settings.update(bad)
    assert settings.current()["log_format"] == "json"
