"""Triton's statistics extension as the service keeps it: what each observation adds, in the shape
tritonclient and perf_analyzer read (the HTTP and gRPC endpoints are tested in test_v2_*.py)."""

from __future__ import annotations

from types import SimpleNamespace

from service.metrics import Metrics
from service.statistics import Statistics


def test_requests_images_and_batches_are_counted_apart():
    stats = Statistics(["a", "b"])
    stats.request("a", True, 0.030)
    stats.request("a", False, 0.002)
    stats.image("a", queue=0.005, compute_input=0.001, compute_infer=0.020, compute_output=0.003)
    stats.image("a", queue=0.004, compute_input=0.001, compute_infer=0.020, compute_output=0.003)
    stats.batch("a", 2, compute_input=0.0005, compute_infer=0.020, compute_output=0.0001)
    (a,) = stats.snapshot("a")
    s = a["inference_stats"]
    assert s["success"] == {"count": 1, "ns": 30_000_000} and s["fail"] == {"count": 1, "ns": 2_000_000}
    assert s["queue"] == {"count": 2, "ns": 9_000_000}
    assert s["compute_infer"] == {"count": 2, "ns": 40_000_000}
    assert (a["inference_count"], a["execution_count"]) == (2, 1)
    assert a["batch_stats"] == [
        {
            "batch_size": 2,
            "compute_input": {"count": 1, "ns": 500_000},
            "compute_infer": {"count": 1, "ns": 20_000_000},
            "compute_output": {"count": 1, "ns": 100_000},
        }
    ]
    assert a["last_inference"] > 1_700_000_000_000  # milliseconds since the epoch
    assert [m["name"] for m in stats.snapshot()] == ["a", "b"]  # every model, in the order served
    assert stats.snapshot("b")[0]["inference_count"] == 0 and stats.snapshot("b")[0]["last_inference"] == 0


def test_batch_sizes_are_listed_in_order_and_unknown_models_ignored():
    stats = Statistics(["a"])
    for size in (4, 1, 4, 2):
        stats.batch("a", size, 0.0, 0.01, 0.0)
    stats.request("none", False, 0.1)  # refused before its model was known: nobody's
    stats.image("auto", 0, 0, 0, 0)
    stats.batch("nope", 1, 0, 0, 0)
    (a,) = stats.snapshot()
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in a["batch_stats"]] == [(1, 1), (2, 1), (4, 2)]
    assert a["execution_count"] == 4 and a["inference_stats"]["fail"]["count"] == 0


def test_a_negative_duration_counts_as_zero():
    """Two processes' clocks: a worker's start a hair before the front end's admission must not
    subtract from the total."""
    stats = Statistics(["a"])
    stats.image("a", queue=-1e-6, compute_input=0, compute_infer=0, compute_output=0)
    assert stats.snapshot("a")[0]["inference_stats"]["queue"] == {"count": 1, "ns": 0}


def served(model: str, decode: float, queue: float, inference: float, prepare: float):
    result = SimpleNamespace(prepare=prepare)
    return SimpleNamespace(
        model=model, result=result, timings={"decode": decode, "queue": queue, "inference": inference}
    )


def test_metrics_split_each_image_into_phases():
    """The worker's preparation moves from infer to input; the encode time is shared by the images
    encoded together; requests count by status; batches feed both the histogram and batch_stats."""
    metrics = Metrics(1 / 30)
    metrics.start_series(["m"], [], [])
    items = [served("m", 0.004, 0.002, 0.030, 0.010), served("m", 0.002, 0.001, 0.030, 0.010)]
    metrics.observe_outputs("v2", items, 0.006)
    metrics.observe_request("m", "v2_http", "200", 0.05)
    metrics.observe_request("m", "grpc", "OK", 0.04)
    metrics.observe_request("m", "http", "429", 0.001)
    metrics.observe_batch("m", 2, 0.010, 0.030, 0.001)
    (m,) = metrics.statistics.snapshot("m")
    s = m["inference_stats"]
    assert s["compute_input"]["ns"] == 26_000_000  # (4 + 10) + (2 + 10) ms
    assert s["compute_infer"]["ns"] == 40_000_000  # (30 - 10) x 2
    assert s["compute_output"] == {"count": 2, "ns": 6_000_000}  # 3 ms each
    assert s["success"]["count"] == 2 and s["fail"]["count"] == 1
    assert m["batch_stats"][0]["compute_infer"]["ns"] == 20_000_000
    text = metrics.exposition()[0].decode()
    assert 'seg_batch_size_count{model="m"} 1.0' in text
    assert 'seg_encode_seconds_count{format="v2"} 1.0' in text
