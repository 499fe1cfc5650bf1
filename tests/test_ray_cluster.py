"""The service on a real two-node Ray cluster on loopback (head 127.0.0.2, node 127.0.0.3).

One cluster and one deployment for the module (random weights, tiny test-time resize). Skips when
ray is not installed, unless BISENET_REQUIRE_RAY=1. Teardown stops only this cluster's processes
(found by its own temp dir and their descendants), never other Ray clusters on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from skimage import data as photos

from service.bench.processes import free_port
from tests.otlp import by_name, check_phases, traceparent
from tests.servicekit import FAST_ARGS, ROOT, Service, held, metric_value, png, wait_for

try:
    import ray  # noqa: F401
except ImportError:
    if os.environ.get("BISENET_REQUIRE_RAY") == "1":
        raise
    pytest.skip(
        "ray is not installed (pip install -e '.[ray]'); BISENET_REQUIRE_RAY=1 makes this fail", allow_module_level=True
    )

pytestmark = pytest.mark.timeout(240)
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"
SLOT = "bisenet_test_slot"  # one per node: two segmentation replicas must take one node each
APP = "bisenet"
MODEL = "bisenetv1_r18"
REPLICA_TITLE = f"ray::ServeReplica:{APP}:segment_{MODEL}"
RAY_ARGS = ["--model", "fast=random", *FAST_ARGS, "--max-batch", "2", "--max-delay-ms", "2"]


# -- processes of this cluster ----------------------------------------------------------------------
def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every live process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), cmdline)
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in table.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def ancestors(pid: int, table: dict[int, tuple[int, str]]) -> set[int]:
    found = set()
    while pid in table and pid not in found:
        found.add(pid)
        pid = table[pid][0]
    return found


class Cluster:
    """`ray start` twice on loopback with token auth, free ports and a temp dir of its own."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="bnray", dir="/tmp")  # short: Ray's socket paths have a limit
        self.port = free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        self.env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # set, it refuses the second node
        self.env.pop("RAY_ADDRESS", None)
        # A replica that cannot start is retried once, not three times: the bad-weights test waits less.
        self.env["RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT"] = "1"
        self.metrics_ports: dict[str, int] = {}  # node ip -> its Ray metrics agent's Prometheus port

    def start(self) -> Cluster:
        common = ["--num-cpus", "2", "--resources", json.dumps({SLOT: 1}), "--object-store-memory", str(200 << 20)]
        common += ["--disable-usage-stats"]

        def node_ports(ip: str) -> list[str]:
            self.metrics_ports[ip] = free_port()
            return [
                "--dashboard-agent-listen-port",
                str(free_port()),
                "--metrics-export-port",
                str(self.metrics_ports[ip]),
            ]

        head = ["--head", "--node-ip-address", HEAD_IP, "--port", str(self.port), "--temp-dir", self.temp_dir]
        head += ["--ray-client-server-port", str(free_port()), "--dashboard-port", str(free_port())]
        head += ["--include-dashboard=false"]
        self._ray_start(head + common + node_ports(HEAD_IP))
        self._ray_start(["--address", self.address, "--node-ip-address", NODE_IP] + common + node_ports(NODE_IP))
        return self

    def _ray_start(self, args: list[str]) -> None:
        done = subprocess.run([RAY, "start", *args], env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"ray start failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    def pids(self) -> set[int]:
        """This cluster's processes: those naming its temp dir, and everything below them."""
        table = process_table()
        mine = ancestors(os.getpid(), table)  # a shell or pytest whose arguments name the dir is not Ray
        roots = {pid for pid, (_, cmd) in table.items() if self.temp_dir in cmd and pid not in mine}
        return descendants(roots, table) - mine

    def raylet(self, ip: str) -> int:
        table = process_table()
        for pid, (_, cmd) in table.items():
            if self.temp_dir in cmd and "/raylet " in cmd + " " and f"--node_ip_address={ip} " in cmd:
                return pid
        raise AssertionError(f"no raylet for {ip}")

    def replicas(self) -> dict[str, list[int]]:
        """node ip -> pids of the segmentation replicas running under its raylet."""
        table = process_table()
        out = {}
        for ip in (HEAD_IP, NODE_IP):
            below = descendants({self.raylet(ip)}, table)
            out[ip] = sorted(pid for pid in below if table[pid][1].strip() == REPLICA_TITLE)
        return out

    def stop(self) -> None:
        """SIGTERM every process of this cluster, SIGKILL what is left after 8 s."""
        for sig, patience in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 10.0)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + patience
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.pids():
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class Launcher:
    """`python -m service.ray` against the cluster, its output collected in the background."""

    def __init__(self, cluster: Cluster, args: list[str], http_port: int | None = None):
        self.http_port = http_port or free_port()
        self.url = f"http://{HEAD_IP}:{self.http_port}"
        cmd = [sys.executable, "-m", "service.ray", "--address", cluster.address, "--host", HEAD_IP]
        cmd += ["--http-port", str(self.http_port), *args]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 150.0) -> Launcher:
        wait_for(lambda: "ready:" in self.output or self.proc.poll() is not None, "the launcher", timeout, every=0.2)
        assert self.proc.poll() is None, f"launcher exited {self.proc.returncode}:\n{self.output[-3000:]}"
        wait_for(lambda: _status(f"{self.url}/readyz") == 200, "/readyz", 30, every=0.2)
        return self

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def segment(url: str, body: bytes, headers: dict | None = None, **params) -> httpx.Response:
    params.setdefault("format", "raw")
    headers = {"content-type": "image/png", **(headers or {})}
    return httpx.post(f"{url}/segment", params=params, content=body, headers=headers, timeout=60)


def raw_labels(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    shape = int(response.headers["x-height"]), int(response.headers["x-width"])
    return np.frombuffer(response.content, np.uint8).reshape(shape)


PHOTOS = {"astronaut": photos.astronaut(), "coffee": photos.coffee(), "chelsea": photos.chelsea()}


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    started = time.monotonic()
    c = Cluster()
    try:
        c.start()
        print(f"\n2-node cluster up in {time.monotonic() - started:.1f} s")
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def deployment(cluster, receiver):
    started = time.monotonic()
    args = [*RAY_ARGS, "--min-replicas", "2", "--replica-resources", f"{SLOT}=1", "--max-ongoing", "2"]
    args += ["--trace-endpoint", receiver.url]
    launcher = Launcher(cluster, [*args, "--max-queue", "4"])
    try:
        launcher.wait_ready()
        print(f"deployed in {time.monotonic() - started:.1f} s")
        yield launcher
    finally:
        launcher.stop()


# -- bad input ------------------------------------------------------------------------------------
def test_address_that_does_not_answer_fails_in_seconds():
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "service.ray", "--address", f"{HEAD_IP}:{free_port()}", *RAY_ARGS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "no Ray cluster answers" in done.stderr
    assert time.monotonic() - started < 20


def test_gpu_deployment_on_a_cluster_without_gpus_is_refused(cluster):
    launcher = Launcher(cluster, ["--model", "fast=random", "--device", "cuda", "--warm-shapes", "none"])
    assert launcher.wait_exit(60) == 2
    assert "need 1 GPU each but the cluster has 0" in launcher.output


# -- the deployment ---------------------------------------------------------------------------------
def test_labels_equal_the_single_host_service(deployment):
    local = Service(["--model", "fast=random", *FAST_ARGS, "--grpc-port", "0"]).wait_ready()
    try:
        for name, image in PHOTOS.items():
            body = png(image)
            on_ray = raw_labels(segment(deployment.url, body))
            single = raw_labels(segment(local.url, body))
            assert on_ray.shape == image.shape[:2]
            assert np.array_equal(on_ray, single), name
    finally:
        local.stop()


def test_the_ingress_traces_requests_with_their_phases(deployment, receiver):
    trace_id, caller, header = traceparent()
    r = segment(deployment.url, png(PHOTOS["coffee"]), headers={"traceparent": header})
    assert r.status_code == 200
    spans = receiver.trace(trace_id, 5)  # the ingress exports every 5 s (OpenTelemetry's default)
    server = by_name(spans)["POST /segment"][0]
    assert server.parent_span_id == caller
    check_phases(spans, server, MODEL)


def test_same_rest_api_and_errors(deployment):
    body = png(PHOTOS["coffee"])
    ok = segment(deployment.url, body, format="json", model="fast")
    assert ok.status_code == 200 and ok.json()["model"] == MODEL
    assert ok.headers["x-model"] == MODEL and "inference;dur=" in ok.headers["server-timing"]
    assert segment(deployment.url, b"not an image").json()["error"]["code"] == "invalid_image"
    assert segment(deployment.url, body, model="nope").status_code == 404
    assert segment(deployment.url, body, format="bmp").status_code == 422
    assert segment(deployment.url, png(np.zeros((2048, 2048, 3), np.uint8)), deadline_ms=1).status_code == 504
    flipped = segment(deployment.url, body, format="raw", tta="flip")
    assert flipped.status_code == 200 and flipped.headers["x-tta"] == "flip"
    auto = segment(deployment.url, body, model="auto")
    assert auto.status_code == 422 and "single-host" in auto.json()["error"]["message"]
    prioritised = segment(deployment.url, body, priority=2)  # Serve's batches have no priorities
    assert prioritised.status_code == 422 and "single-host" in prioritised.json()["error"]["message"]
    v2 = httpx.post(
        f"{deployment.url}/v2/models/{MODEL}/infer",
        json={"inputs": [{"name": "RGB", "datatype": "UINT8", "shape": [1, 8, 8, 3], "data": [0] * 192}]},
        timeout=60,
    )
    assert v2.status_code == 200 and v2.json()["outputs"][0]["shape"] == [1, 8, 8], v2.text
    in_shm = {"shared_memory_region": "r", "shared_memory_byte_size": 192}
    refused = httpx.post(
        f"{deployment.url}/v2/models/{MODEL}/infer",
        json={"inputs": [{"name": "RGB", "datatype": "UINT8", "shape": [1, 8, 8, 3], "parameters": in_shm}]},
        timeout=60,
    )
    assert refused.status_code == 422 and "single-host" in refused.json()["error"]  # no shared memory on Ray
    assert "system_shared_memory" not in httpx.get(f"{deployment.url}/v2", timeout=10).json()["extensions"]
    models = httpx.get(f"{deployment.url}/models", timeout=10).json()
    assert models["models"][0]["ready"] and len(models["models"][0]["classes"]) == 19
    assert httpx.get(f"{deployment.url}/healthz", timeout=10).status_code == 200
    text = httpx.get(f"{deployment.url}/metrics", timeout=10).text
    assert metric_value(text, "seg_batch_size_count", model=MODEL) >= 1
    assert metric_value(text, "seg_inference_seconds_count", model=MODEL) >= 1
    assert metric_value(text, "seg_requests_rejected_total", reason="invalid_image") >= 1
    (stats,) = httpx.get(f"{deployment.url}/v2/models/{MODEL}/stats", timeout=10).json()["model_stats"]
    assert stats["inference_count"] >= 1 and stats["execution_count"] >= 1  # Triton's statistics, per ingress
    assert stats["inference_stats"]["fail"]["count"] >= 1 and stats["batch_stats"][0]["compute_infer"]["ns"] > 0


def test_replica_metrics_reach_each_nodes_prometheus_endpoint(cluster, deployment):
    """The segmentation replicas' histograms, exported by the Ray metrics agent of the node they run on."""
    body = png(PHOTOS["coffee"])
    with ThreadPoolExecutor(6) as pool:  # more than one replica holds (--max-ongoing 2): both get some
        assert {r.status_code for r in pool.map(lambda _: segment(deployment.url, body), range(6))} == {200}

    def exported(ip: str) -> bool:
        text = httpx.get(f"http://{ip}:{cluster.metrics_ports[ip]}/metrics", timeout=10).text
        return metric_value(text, "ray_seg_inference_seconds_count", model=MODEL) >= 1

    for ip in (HEAD_IP, NODE_IP):
        wait_for(lambda ip=ip: exported(ip), f"ray_seg_inference_seconds on {ip}", timeout=40, every=1)


def test_replicas_are_spread_over_both_nodes(cluster, deployment):
    replicas = cluster.replicas()
    assert len(replicas[HEAD_IP]) == 1 and len(replicas[NODE_IP]) == 1, replicas


def test_full_queues_answer_429_with_retry_after(cluster, deployment):
    """Both replicas held (SIGSTOP): the ingress admits 2 replicas x 2 (--max-ongoing) + 4 (--max-queue)
    requests and refuses the rest at once, whatever Serve's router believes about the held replicas."""
    pids = [pid for pids in cluster.replicas().values() for pid in pids]
    body = png(PHOTOS["chelsea"])
    with ThreadPoolExecutor(12) as pool:
        with held(*pids):
            futures = [pool.submit(segment, deployment.url, body) for _ in range(12)]
            wait_for(lambda: sum(f.done() for f in futures) >= 4, "429 answers", timeout=30)
            refused = [f.result() for f in futures if f.done()]
        answers = [f.result() for f in futures]
    assert all(r.status_code == 429 and r.headers["retry-after"] == "1" for r in refused), [r.text for r in refused]
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {200, 429} and codes.count(200) >= 4, codes  # every admitted request completes


def test_killing_a_replica_under_load_loses_nothing(cluster, deployment):
    body = png(PHOTOS["astronaut"])
    before = cluster.replicas()
    victim = before[NODE_IP][0]
    statuses: list[int] = []
    lock = threading.Lock()

    def client(n: int) -> int:
        """n requests, each retried on a retryable 503; returns how many succeeded."""
        done = 0
        for _ in range(n):
            for _attempt in range(10):
                response = segment(deployment.url, body)
                with lock:
                    statuses.append(response.status_code)
                if response.status_code == 200:
                    done += 1
                    break
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] in ("worker_restarting", "not_ready")
                time.sleep(float(response.headers.get("retry-after", "1")))
        return done

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client, 8) for _ in range(3)]
        wait_for(lambda: statuses.count(200) >= 3, "the first answers", timeout=60)
        os.kill(victim, signal.SIGKILL)
        assert sum(f.result(timeout=120) for f in futures) == 24
    print(f"replica killed under load: {statuses.count(200)} answered, {statuses.count(503)} retried 503s")
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) <= 6

    def recovered() -> bool:
        now = cluster.replicas()
        return sum(len(p) for p in now.values()) == 2 and victim not in now[NODE_IP]

    wait_for(recovered, "a replacement replica", timeout=90, every=0.5)
    wait_for(lambda: _status(f"{deployment.url}/readyz") == 200, "/readyz after recovery", timeout=30)
    assert segment(deployment.url, body).status_code == 200


def test_sigterm_undeploys(cluster, deployment):
    assert deployment.stop() == 0
    assert "undeploying" in deployment.output
    wait_for(lambda: not cluster.replicas()[HEAD_IP] and not cluster.replicas()[NODE_IP], "replicas to stop", 30)
    assert _status(f"{deployment.url}/healthz") != 200


# -- after the main deployment (Serve serves one application at "/") ----------------------------------
def test_weights_that_cannot_load_stop_the_launcher_with_the_reason(cluster, tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"this is not a checkpoint")
    launcher = Launcher(cluster, ["--model", f"mine={bad}", *FAST_ARGS, "--ready-timeout", "150"])
    code = launcher.wait_exit(170)
    assert code == 1, launcher.output[-3000:]
    assert "deployment failed" in launcher.output
    assert "broken.pth" in launcher.output  # the replica's own error names the file


def test_teardown_leaves_no_process_of_this_cluster(cluster):
    assert cluster.pids()
    cluster.stop()
    assert not cluster.pids(), [process_table().get(pid) for pid in cluster.pids()]
