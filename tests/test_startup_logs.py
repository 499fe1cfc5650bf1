"""Start-up says what it does: each step (fetch, load, warm, ready) with its time, download progress
as log lines when there is no terminal, and `--log-format json` for every line, uvicorn's and the
worker's included. The weights come from a local HTTP server, as from a mirror."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import re
import shutil
import threading

import pytest

from model.checkpoint import download
from tests.servicekit import Service


@pytest.fixture(scope="module")
def weights_server(tmp_path_factory, r18_checkpoint):
    """127.0.0.1 HTTP server holding the random R18 checkpoint as r18-weights.pth."""
    folder = tmp_path_factory.mktemp("mirror")
    shutil.copy(r18_checkpoint, folder / "r18-weights.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def json_lines(tmp_path_factory, weights_server) -> list[dict]:
    """Every line a JSON-logging service wrote from start to ready and a clean stop."""
    tmp = tmp_path_factory.mktemp("json-logs")
    log_path = tmp / "service.log"
    args = [
        "--model",
        f"bisenetv1_r18={weights_server}/r18-weights.pth",
        "--device",
        "cpu",
        "--resize-scale",
        "256x128",
        "--warm-shapes",
        "64x96",
        "--max-batch",
        "4",
        "--log-format",
        "json",
        "--log-level",
        "info",
    ]
    svc = Service(args, env={"BISENET_CACHE_DIR": str(tmp / "cache")}, log_path=log_path)
    try:
        svc.wait_ready()
    finally:
        assert svc.stop() == 0
    return [json.loads(line) for line in log_path.read_text().splitlines()]  # each line must parse


def messages(lines: list[dict], logger_prefix: str = "") -> str:
    return "\n".join(e["message"] for e in lines if e["logger"].startswith(logger_prefix))


def test_every_line_is_one_json_object_from_every_part(json_lines):
    assert {"time", "level", "logger", "pid", "message"} <= set(json_lines[0])
    loggers = {e["logger"] for e in json_lines}
    assert {"uvicorn.error", "service", "service.worker", "model.checkpoint"} <= loggers, loggers
    assert any("Uvicorn running on http://127.0.0.1:" in e["message"] for e in json_lines)
    assert len({e["pid"] for e in json_lines}) == 2  # the front end and its worker
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in json_lines)


def test_start_up_logs_each_step_with_its_time(json_lines, weights_server):
    text = messages(json_lines)
    steps = [
        rf"fetch: weights for bisenetv1_r18 from {re.escape(weights_server)}/r18-weights.pth in [\d.]+s",
        r"load: model bisenetv1_r18 \(.*r18-weights\.pth\) on cpu in [\d.]+s",
        r"warm: model bisenetv1_r18, shapes \(\(64, 96\),\), batch sizes \(1,\) in [\d.]+s",  # one batch size on CPU
        r"ready: bisenetv1_r18 on cpu, [\d.]+s after start",
    ]
    positions = []
    for step in steps:
        match = re.search(step, text)
        assert match, f"no line matching {step!r} in:\n{text}"
        positions.append(match.start())
    assert positions == sorted(positions)  # in the order they happen


def test_the_download_is_logged_with_its_progress(json_lines):
    text = messages(json_lines, "model.checkpoint")
    assert re.search(r"downloading r18-weights\.pth \(\d+ MB\) from http://", text), text
    assert re.search(r"downloading r18-weights\.pth: 100% of \d+ MB", text), text


def test_progress_lines_come_every_tenth_of_the_file(tmp_path, caplog, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "weights.pth").write_bytes(bytes(20 << 20))  # 20 chunks of 1 MiB
    monkeypatch.setenv("BISENET_WEIGHTS_MIRROR", str(mirror))
    with caplog.at_level(logging.INFO, logger="model.checkpoint"):
        path = download("https://example.invalid/weights.pth", tmp_path / "cache")
    assert path.read_bytes() == bytes(20 << 20)
    progress = [r.getMessage() for r in caplog.records if ": " in r.getMessage() and "% of" in r.getMessage()]
    assert progress == [f"downloading weights.pth: {p}% of 20 MB" for p in range(10, 101, 10)]
