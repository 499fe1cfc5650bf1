"""Deployment checks that need no Docker engine: the Dockerfile, both compose files, Prometheus's
configuration and alert rules, the Grafana dashboard, and the container's command run as a plain
process against a live Prometheus.

Tools: promtool/prometheus, docker compose (plugin or Debian's docker-compose), hadolint and PyYAML.
`tools/ensure_deploy_tools.sh` installs whichever is missing (the session fixture below runs it
once when needed); a test skips, naming the tool, only if it still cannot be found.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.bench.processes import service_command, wait_http_ready
from tests.servicekit import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PROM_DIR = DOCKER / "prometheus"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "bisenet.json"
COMPOSE_FILES = {"gpu": ROOT / "docker-compose.yml", "cpu": ROOT / "docker-compose.cpu.yml"}
VENV_BIN = Path(sys.executable).parent
HAS_SERVICE = importlib.util.find_spec("service") is not None and (ROOT / "service" / "__main__.py").exists()
needs_service = pytest.mark.skipif(not HAS_SERVICE, reason="the service package (python -m service) is not there yet")

# The metrics the service exports (service/metrics.py), by type. Dashboard and rules may use only
# these (histograms through _bucket/_sum/_count) and what Prometheus itself makes (up, ...).
CONTRACT = {
    "seg_request_duration_seconds": "histogram",
    "seg_decode_seconds": "histogram",
    "seg_queue_wait_seconds": "histogram",
    "seg_inference_seconds": "histogram",
    "seg_encode_seconds": "histogram",
    "seg_batch_size": "histogram",
    "seg_queue_depth": "gauge",
    "seg_requests_in_flight": "gauge",
    "seg_realtime_target_seconds": "gauge",
    "seg_requests_over_budget_total": "counter",
    "seg_requests_rejected_total": "counter",
    "seg_cuda_graph_replays_total": "counter",
    "seg_cuda_graph_misses_total": "counter",
    "seg_worker_restarts_total": "counter",
    "seg_device_memory_bytes": "gauge",
    "seg_ready": "gauge",
    "seg_stream_frames_dropped_total": "counter",
    "seg_streams_active": "gauge",
    "seg_shm_slots_in_use": "gauge",
}
PROMETHEUS_MADE = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS", "ALERTS_FOR_STATE"}
HIST_SUFFIXES = ("_bucket", "_sum", "_count")


# ------------------------------------------------------------------------------------------------
# tools


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    local = VENV_BIN / name
    return str(local) if local.exists() else None


def compose_commands() -> list[list[str]]:
    commands = []
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            commands.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        commands.append(["docker-compose"])
    return commands


def python_has_yaml() -> bool:
    return importlib.util.find_spec("yaml") is not None


@pytest.fixture(scope="session")
def deploy_tools() -> None:
    """Run tools/ensure_deploy_tools.sh once if anything the checks use is missing."""
    missing = [t for t in ("promtool", "prometheus", "hadolint") if not find_tool(t)]
    if missing or not compose_commands() or not python_has_yaml():
        subprocess.run(
            ["bash", str(ROOT / "tools" / "ensure_deploy_tools.sh"), str(VENV_BIN.parent)], timeout=280, check=False
        )
        importlib.invalidate_caches()


def need(name: str, deploy_tools) -> str:
    path = find_tool(name)
    if not path:
        pytest.skip(f"{name} is not installed and tools/ensure_deploy_tools.sh could not install it")
    return path


@pytest.fixture(scope="session")
def yaml(deploy_tools):
    if not python_has_yaml():
        pytest.skip("PyYAML is not installed and tools/ensure_deploy_tools.sh could not install it")
    import yaml

    return yaml


@pytest.fixture(scope="session")
def compose(deploy_tools) -> list[str]:
    commands = compose_commands()
    if not commands:
        pytest.skip("neither `docker compose` nor docker-compose is installed, and Debian's could not be")
    return commands[0]


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# ------------------------------------------------------------------------------------------------
# PromQL metric names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (Grafana variables allowed)."""
    e = re.sub(r"\$\{?__\w+\}?", "5m", expr)  # $__rate_interval, $__interval, ...
    e = re.sub(r"\$\{?\w+\}?", "x", e)  # dashboard variables, only ever inside label matchers
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', e)
    e = re.sub(r"\{[^{}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", e)
    e = re.sub(r"\b(offset|@)\s*-?[\w.]+", " ", e)
    e = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", " ", e)  # numbers
    keywords = {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "Inf",
        "NaN",
        "inf",
        "nan",
        "atan2",
    }
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", e):
        rest = e[m.end() :].lstrip()
        if m.group() in keywords or rest.startswith("("):  # functions and aggregations
            continue
        names.add(m.group())
    return names


def exported_names(families: dict[str, str]) -> set[str]:
    """Every series name a set of metric families ({name: type}) can produce."""
    names = set()
    for name, kind in families.items():
        names.add(name)
        if kind == "histogram":
            names.update(name + s for s in HIST_SUFFIXES)
    return names


def parse_exposition(text: str) -> tuple[dict[str, str], set[str]]:
    """Families ({name: type}, from # TYPE lines) and the names that have samples."""
    families, sampled = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            families[name] = kind.strip()
        elif line and not line.startswith("#"):
            sampled.add(re.match(r"[A-Za-z_:][\w:]*", line).group())
    return families, sampled


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard, its variables included."""
    board = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
            walk(p.get("panels", []))

    walk(board["panels"])
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", query)
            out.append((f"variable {var['name']!r}", m.group(1) if m else query))
    return out


def rule_exprs(yaml) -> list[tuple[str, str]]:
    groups = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
    return [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for g in groups for r in g["rules"]]


def test_metric_name_parser():
    expr = (
        'histogram_quantile(0.99, sum by (model, le) (rate(seg_x_bucket{code=~"2..|OK",model=~"$model"}'
        '[$__rate_interval]))) > on() group_left() max(seg_target) or absent(up{job="a"}) * 1e3'
    )
    assert metric_names(expr) == {"seg_x_bucket", "seg_target", "up"}
    assert metric_names("sum(rate(a_total[5m] offset 1h)) / scalar(b) unless c") == {"a_total", "b", "c"}


# ------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_hadolint_has_no_errors(deploy_tools):
    hadolint = need("hadolint", deploy_tools)
    result = run([hadolint, "--no-color", "--format", "json", "--failure-threshold", "error", str(ROOT / "Dockerfile")])
    findings = json.loads(result.stdout or "[]")
    errors = [f for f in findings if f["level"] == "error"]
    assert not errors, f"hadolint errors: {errors}"
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_what_an_operator_expects():
    ins = dockerfile_instructions()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for word, rest in ins if word == "ARG" and "=" in rest}
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    base = args.get("BASE_IMAGE", "")
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base), base
    final = [i for i, (word, _) in enumerate(ins) if word == "FROM"][-1]
    runtime = ins[final:]
    words = [word for word, _ in runtime]
    user = [rest for word, rest in runtime if word == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the runtime stage runs as a non-root user"
    assert not any("apt-get install" in rest or "build-essential" in rest for word, rest in runtime if word == "RUN")
    exposed = {p for word, rest in runtime if word == "EXPOSE" for p in rest.split()}
    assert {"8000", "50051"} <= exposed
    assert "VOLUME" in words and "HEALTHCHECK" in words
    health = next(rest for word, rest in runtime if word == "HEALTHCHECK")
    assert "/readyz" in health and "curl" not in health
    entry = next(rest for word, rest in runtime if word == "ENTRYPOINT")
    assert json.loads(entry) == ["python", "-m", "service"]
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert "PYTHONUNBUFFERED=1" in env and "BISENET_CACHE_DIR=" in env and "BISENET_HOST=0.0.0.0" in env
    # torch comes from the base image and is held there by a constraint; pip installs the project.
    builder = " ".join(rest for word, rest in ins[:final] if word == "RUN")
    assert "--system-site-packages" in builder and "torch-constraint" in builder and "constraints.txt" in builder


def test_docker_constraints_pin_every_runtime_dependency():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
    wanted = {norm(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in deps} - {"torch"}
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line!r}"
            pins[norm(name)] = version
    assert wanted <= set(pins), f"add to docker/constraints.txt (tools/lock_docker_deps.sh): {wanted - set(pins)}"
    assert "torch" not in pins, "torch comes from the base image"


def test_dockerignore_keeps_the_context_small():
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "**" in lines
    for needed in ("!pyproject.toml", "!README.md", "!model/", "!service/", "!proto/", "!docker/constraints.txt"):
        assert needed in lines, needed


# ------------------------------------------------------------------------------------------------
# compose


@pytest.mark.parametrize("variant", sorted(COMPOSE_FILES))
@pytest.mark.parametrize("env_file", ["none", ".env.example"])
def test_compose_config_validates(variant, env_file, deploy_tools, tmp_path):
    commands = compose_commands()
    if not commands:
        pytest.skip("neither `docker compose` nor docker-compose is installed, and Debian's could not be")
    if env_file == "none":
        env_path = tmp_path / "empty.env"
        env_path.write_text("")
    else:
        env_path = ROOT / env_file
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BISENET_", "COMPOSE_", "GRAFANA_"))}
    for cmd in commands:  # every compose implementation present must accept it
        result = run(
            [*cmd, "--env-file", str(env_path), "-f", str(COMPOSE_FILES[variant]), "config"], cwd=ROOT, env=clean
        )
        assert result.returncode == 0, f"{' '.join(cmd)} config: {result.stderr}"
        assert "segmentation" in result.stdout and "prometheus" in result.stdout and "grafana" in result.stdout


def load_compose(yaml, variant: str) -> dict:
    return yaml.safe_load(COMPOSE_FILES[variant].read_text())


def test_compose_gpu_service_is_complete(yaml):
    svc = load_compose(yaml, "gpu")["services"]["segmentation"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert svc["environment"]["BISENET_DEVICE"].startswith("${BISENET_DEVICE:-cuda")
    assert svc["shm_size"].startswith("${BISENET_SHM_SIZE:-2gb")
    assert svc["restart"] in ("unless-stopped", "always")
    assert svc["init"] is True
    assert "/readyz" in " ".join(svc["healthcheck"]["test"]) and svc["healthcheck"]["start_period"]
    assert any(v.startswith("weights:/var/cache/bisenet-serve") for v in svc["volumes"])
    assert {p.rsplit(":", 1)[-1] for p in svc["ports"]} == {"8000", "50051"}
    assert svc["environment"]["BISENET_CACHE_DIR"].startswith("/var/cache/bisenet-serve")
    assert svc["logging"]["driver"] == "json-file"  # stdout/stderr, rotated


def test_compose_variants_differ_only_in_the_device(yaml):
    gpu, cpu = load_compose(yaml, "gpu"), load_compose(yaml, "cpu")
    assert gpu["volumes"] == cpu["volumes"]
    assert gpu["services"]["prometheus"] == cpu["services"]["prometheus"]
    assert gpu["services"]["grafana"] == cpu["services"]["grafana"]
    g, c = dict(gpu["services"]["segmentation"]), dict(cpu["services"]["segmentation"])
    assert "deploy" in g and "deploy" not in c, "the CPU variant reserves no GPU"
    g.pop("deploy")
    genv, cenv = g.pop("environment"), c.pop("environment")
    assert g == c
    assert cenv.pop("BISENET_DEVICE") == "cpu"
    genv.pop("BISENET_DEVICE")
    assert set(genv) == set(cenv)
    differing = {k for k in genv if genv[k] != cenv[k]}
    assert differing <= {"BISENET_MODELS", "BISENET_MAX_BATCH", "BISENET_TARGET_FPS"}, differing


def test_compose_shared_memory_holds_the_frame_pool(yaml):
    units = {"b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30}
    for variant in COMPOSE_FILES:
        svc = load_compose(yaml, variant)["services"]["segmentation"]
        size = re.fullmatch(r"\$\{BISENET_SHM_SIZE:-(\d+)([a-z]*)\}", svc["shm_size"])
        pool = re.fullmatch(r"\$\{BISENET_SHM_BYTES:-(\d+)\}", svc["environment"]["BISENET_SHM_BYTES"])
        assert size and pool, (svc["shm_size"], svc["environment"]["BISENET_SHM_BYTES"])
        shm = int(size.group(1)) * units[size.group(2) or "b"]
        assert shm >= int(pool.group(1)) + (512 << 20), "leave /dev/shm headroom above the frame pool"


@needs_service
def test_compose_passes_every_setting_of_the_service(yaml):
    """Each BISENET_* variable the service documents in --help reaches the container (TLS needs
    mounted files, so it is left to the operator)."""
    result = run([sys.executable, "-m", "service", "--help"], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    documented = set(re.findall(r"BISENET_[A-Z0-9_]+", result.stdout)) - {"BISENET_TLS_CERT", "BISENET_TLS_KEY"}
    for variant in COMPOSE_FILES:
        passed = set(load_compose(yaml, variant)["services"]["segmentation"]["environment"])
        assert documented <= passed, f"{variant}: add to the compose environment: {documented - passed}"


def test_compose_images_are_pinned(yaml):
    for variant in COMPOSE_FILES:
        for name, svc in load_compose(yaml, variant)["services"].items():
            image = svc["image"]
            assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{variant}/{name}: pin {image!r} to a version"


def test_env_example_names_only_real_settings():
    text = (ROOT / ".env.example").read_text()
    names = set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", text, flags=re.M))
    compose = COMPOSE_FILES["gpu"].read_text() + COMPOSE_FILES["cpu"].read_text()
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]+)", compose))
    assert names, ".env.example lists settings"
    assert names <= used, f".env.example names settings compose ignores: {names - used}"
    assert used <= names, f"document in .env.example: {used - names}"


# ------------------------------------------------------------------------------------------------
# Prometheus


def test_promtool_check_config(deploy_tools):
    promtool = need("promtool", deploy_tools)
    result = run([promtool, "check", "config", str(PROM_DIR / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_rules(deploy_tools):
    promtool = need("promtool", deploy_tools)
    result = run([promtool, "check", "rules", str(PROM_DIR / "alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass(deploy_tools):
    promtool = need("promtool", deploy_tools)
    result = run([promtool, "test", "rules", str(PROM_DIR / "alerts_test.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_that_fires_it(yaml):
    groups = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    assert {
        "SegmentationP99OverBudget",
        "SegmentationFramesDropped",
        "SegmentationRequestsShed",
        "SegmentationWorkerRestarted",
        "SegmentationNotReady",
        "SegmentationTargetDown",
    } <= alerts
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t.get("alert_rule_test", []) if c.get("exp_alerts")}
    quiet = {c["alertname"] for t in tests for c in t.get("alert_rule_test", []) if not c.get("exp_alerts")}
    assert alerts <= fired, f"alerts without a firing test: {alerts - fired}"
    assert {"SegmentationP99OverBudget", "SegmentationRequestsShed"} <= quiet


def test_prometheus_scrapes_the_service_job(yaml):
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = [t for sc in jobs["bisenet-serve"]["static_configs"] for t in sc["targets"]]
    assert targets == ["segmentation:8000"]
    assert 'job="bisenet-serve"' in (PROM_DIR / "alerts.yml").read_text()


# ------------------------------------------------------------------------------------------------
# Grafana


def test_dashboard_shows_what_operators_need():
    board = json.loads(DASHBOARD.read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in panels:
        assert p["targets"], p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
    text = json.dumps(board)
    for needed in (
        "seg_decode_seconds_bucket",
        "seg_queue_wait_seconds_bucket",
        "seg_inference_seconds_bucket",
        "seg_encode_seconds_bucket",
        "seg_request_duration_seconds_bucket",
        "seg_realtime_target_seconds",
        "seg_batch_size",
        "seg_queue_depth",
        "seg_stream_frames_dropped_total",
        "seg_requests_rejected_total",
        "seg_cuda_graph_replays_total",
        "seg_cuda_graph_misses_total",
        "seg_device_memory_bytes",
    ):
        assert needed in text, needed
    # the latency panels draw the budget line
    latency = [p for p in panels if p["type"] == "timeseries" and "latency" in p["title"].lower()]
    assert latency and all(any("seg_realtime_target_seconds" in t["expr"] for t in p["targets"]) for p in latency)
    # the datasource is the provisioned one
    ds = (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    uid = re.search(r"uid:\s*(\S+)", ds).group(1)
    assert board["templating"]["list"][0]["current"]["value"] == uid
    assert "/etc/grafana/dashboards" in (DOCKER / "grafana" / "provisioning" / "dashboards" / "bisenet.yml").read_text()


def test_dashboard_and_rules_use_only_exported_metrics(yaml):
    allowed = exported_names(CONTRACT) | PROMETHEUS_MADE
    used = {}
    for where, expr in dashboard_exprs() + rule_exprs(yaml):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for n in names:
            used.setdefault(n, where)
    unknown = {n: where for n, where in used.items() if n not in allowed}
    assert not unknown, f"not exported by the service: {unknown}"
    # and every exported metric is on the dashboard or in a rule
    base = {
        n[: -len(s)] if any(n.endswith(s) for s in HIST_SUFFIXES) and n[: -len(s)] in CONTRACT else n
        for n in used
        for s in [next((s for s in HIST_SUFFIXES if n.endswith(s)), "")]
    }
    assert set(CONTRACT) <= base, f"not shown anywhere: {set(CONTRACT) - base}"


def test_dashboard_queries_parse(deploy_tools, yaml, tmp_path):
    promtool = need("promtool", deploy_tools)
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": sub_grafana_vars(expr)}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def sub_grafana_vars(expr: str, rate_interval: str = "1m") -> str:
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
    return re.sub(r"\$\{?model\}?", ".*", expr)


@needs_service
def test_service_registry_declares_every_used_metric(yaml):
    from service.metrics import Metrics

    families, _ = parse_exposition(Metrics(1 / 30).exposition()[0].decode())
    exported = exported_names(families) | PROMETHEUS_MADE
    assert set(CONTRACT) <= set(families), f"missing from service/metrics.py: {set(CONTRACT) - set(families)}"
    for where, expr in dashboard_exprs() + rule_exprs(yaml):
        assert metric_names(expr) <= exported, f"{where}: {metric_names(expr) - exported}"


# ------------------------------------------------------------------------------------------------
# the container's command as a process: bad settings, compose defaults, a live service + Prometheus


def compose_environment(yaml, compose: list[str], variant: str, env_text: str, tmp_path) -> dict[str, str]:
    """The segmentation container's environment as compose resolves it from an .env file."""
    env_file = tmp_path / f"{variant}.env"
    env_file.write_text(env_text)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BISENET_", "COMPOSE_", "GRAFANA_"))}
    result = run(
        [*compose, "--env-file", str(env_file), "-f", str(COMPOSE_FILES[variant]), "config"], cwd=ROOT, env=clean
    )
    assert result.returncode == 0, result.stderr
    environment = yaml.safe_load(result.stdout)["services"]["segmentation"]["environment"]
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: "" if v is None else str(v) for k, v in environment.items()}


def process_env(container_env: dict[str, str], **overrides: str) -> dict[str, str]:
    """This machine's environment without BISENET_* settings, plus a container's, plus overrides;
    the address is always loopback with free ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BISENET_")}
    env.update(container_env)
    env.update(BISENET_HOST="127.0.0.1", BISENET_HTTP_PORT=str(free_port()), BISENET_GRPC_PORT=str(free_port()))
    env.update(overrides)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_fails(env: dict[str, str], timeout: float = 150) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the service did not exit on a bad setting within {timeout}s: {err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


BAD_ENV = {
    "unknown model": ("BISENET_MODELS=bisenetv1_r101\n", r"unknown model.*bisenetv1_r101"),
    "malformed number": ("BISENET_MAX_BATCH=eight\n", r"max.batch.*eight"),
    "malformed shape": ("BISENET_WARM_SHAPES=1024by2048\n", r"1024by2048"),
    "malformed device": ("BISENET_DEVICE=gpu0\n", r"device.*gpu0"),
}


@needs_service
@pytest.mark.parametrize("case", sorted(BAD_ENV))
def test_bad_env_file_stops_the_service_with_a_clear_message(case, yaml, compose, tmp_path):
    env_text, pattern = BAD_ENV[case]
    container = compose_environment(yaml, compose, "gpu", env_text, tmp_path)
    result = start_fails(process_env(container))
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert re.search(pattern, message, flags=re.I), f"unclear message: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


@needs_service
def test_gpu_stack_without_a_gpu_says_so(yaml, compose, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    container = compose_environment(yaml, compose, "gpu", "", tmp_path)
    assert container["BISENET_DEVICE"] == "cuda"
    result = start_fails(process_env(container, BISENET_MODELS="bisenetv1_r18=random"))
    assert result.returncode != 0
    assert re.search(r"cuda|gpu", result.stderr, flags=re.I) and "Traceback" not in result.stderr, result.stderr


@needs_service
@pytest.mark.parametrize("variant", sorted(COMPOSE_FILES))
def test_compose_defaults_are_settings_the_service_accepts(variant, yaml, compose, tmp_path):
    """Compose passes every setting explicitly; its defaults must parse and match the service's own
    (apart from the device, and the CPU file's smaller sizes)."""
    container = compose_environment(yaml, compose, variant, "", tmp_path)
    probe = (
        "import dataclasses, json; from service.config import load_settings; "
        "print(json.dumps(dataclasses.asdict(load_settings([])), default=str))"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("BISENET_")}
    own = run([sys.executable, "-c", probe], cwd=ROOT, env=base)
    assert own.returncode == 0, own.stderr
    got = run([sys.executable, "-c", probe], cwd=ROOT, env={**base, **container})
    assert got.returncode == 0, got.stderr
    own, got = json.loads(own.stdout), json.loads(got.stdout)
    differing = {k for k in own if own[k] != got[k]} - {"devices", "host"}
    expected = set() if variant == "gpu" else {"models", "max_batch", "batch_buckets", "target_fps"}
    assert differing == expected, {k: (own[k], got[k]) for k in differing}


@contextlib.contextmanager
def run_until_stopped(cmd, env, log, ready_url: str, ready_s: float, stop_s: float):
    """Run `cmd` in its own process group (output to `log`), enter once `ready_url` answers 200,
    then SIGTERM the group (SIGKILL after `stop_s`). Fails the test with the log's tail if the
    process exits or is not ready in `ready_s`."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_http_ready(proc, ready_url, ready_s)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{Path(cmd[0]).name} {exc}: {log.read_text()[-3000:]}")
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=stop_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def live_service(tmp_path_factory, receiver):
    """`python -m service` with random R18 weights on the CPU, on loopback, until /readyz says 200;
    it traces to a local OTLP receiver, so its latency buckets carry exemplars."""
    if not HAS_SERVICE:
        pytest.skip("the service package (python -m service) is not there yet")
    http_port = free_port()
    log = tmp_path_factory.mktemp("service") / "service.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BISENET_")}
    args = ["--model", "bisenetv1_r18=random", "--device", "cpu", "--warm-shapes", "64x128", "--max-batch", "2"]
    args += ["--trace-endpoint", receiver.url, "--trace-rate", "0"]  # traced when the caller asks
    base = f"http://127.0.0.1:{http_port}"
    with run_until_stopped(service_command(http_port, free_port(), args), env, log, base + "/readyz", 200, 30):
        yield base


def png_bytes(height: int = 64, width: int = 128) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def send_traffic(base: str, n: int = 4) -> None:
    """A few good requests in two output formats, and some the service rejects."""
    import httpx

    image = png_bytes()
    with httpx.Client(base_url=base, timeout=120) as client:
        for i in range(n):
            fmt = "png" if i % 2 == 0 else "json"
            r = client.post("/segment", files={"image": ("frame.png", image, "image/png")}, params={"format": fmt})
            assert r.status_code == 200, r.text
        r = client.post("/segment", files={"image": ("frame.png", b"not an image", "image/png")})
        assert r.status_code == 400, r.text
        r = client.post(
            "/segment", files={"image": ("frame.png", image, "image/png")}, params={"model": "no_such_model"}
        )
        assert r.status_code == 404, r.text


def test_live_metrics_export_every_name_the_dashboard_and_rules_use(live_service, yaml):
    import httpx

    send_traffic(live_service)
    text = httpx.get(live_service + "/metrics", timeout=10).text
    families, sampled = parse_exposition(text)
    exported = exported_names(families) | PROMETHEUS_MADE
    missing = {}
    for where, expr in dashboard_exprs() + rule_exprs(yaml):
        for name in metric_names(expr) - exported:
            missing.setdefault(name, where)
    assert not missing, f"used but not in /metrics: {missing}"
    assert set(CONTRACT) <= set(families), set(CONTRACT) - set(families)
    # after traffic the latency, batching and rejection series have samples
    for name in (
        "seg_request_duration_seconds_bucket",
        "seg_decode_seconds_bucket",
        "seg_queue_wait_seconds_bucket",
        "seg_inference_seconds_bucket",
        "seg_encode_seconds_bucket",
        "seg_batch_size_bucket",
        "seg_requests_rejected_total",
        "seg_realtime_target_seconds",
        "seg_ready",
    ):
        assert name in sampled, name
    # one bucket edge is the frame budget itself
    edges = {float(m) for m in re.findall(r'seg_request_duration_seconds_bucket\{[^}]*le="([^"+]+)"', text)}
    assert any(abs(e - 1 / 30) < 1e-5 for e in edges), sorted(edges)


REJECT_REASONS = (
    "queue_full",
    "deadline",
    "invalid_image",
    "too_large",
    "unsupported_media_type",
    "not_found",
    "not_ready",
    "unauthorized",
    "bad_request",
)


def test_live_alerted_counters_start_at_zero(live_service):
    """Counters that alerts take increase()/rate() of must exist (at 0) before their first event,
    or the first worker restart, drop or rejection of a kind never shows as an increase."""
    import httpx

    text = httpx.get(live_service + "/metrics", timeout=10).text
    _, sampled = parse_exposition(text)
    missing = [n for n in ("seg_worker_restarts_total", "seg_stream_frames_dropped_total") if n not in sampled]
    missing += [r for r in REJECT_REASONS if f'seg_requests_rejected_total{{reason="{r}"}}' not in text]
    assert not missing, f"no series at start: {missing}"


@pytest.fixture(scope="module")
def live_prometheus(live_service, yaml, tmp_path_factory):
    """A real Prometheus on loopback with the shipped rules, scraping the live service every second."""
    prometheus = find_tool("prometheus")
    if not prometheus:
        subprocess.run(
            ["bash", str(ROOT / "tools" / "ensure_deploy_tools.sh"), str(VENV_BIN.parent)], timeout=280, check=False
        )
        prometheus = find_tool("prometheus")
    if not prometheus:
        pytest.skip("prometheus is not installed and tools/ensure_deploy_tools.sh could not install it")
    work = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_DIR / f) for f in config["rule_files"]]
    service_addr = live_service.removeprefix("http://")
    for job in config["scrape_configs"]:
        address = service_addr if job["job_name"] == "bisenet-serve" else f"127.0.0.1:{port}"
        job["static_configs"] = [{"targets": [address]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    features = [a for a in load_compose(yaml, "gpu")["services"]["prometheus"]["command"] if "--enable-feature" in a]
    cmd = [
        prometheus,
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        *features,  # as compose runs it: exemplar storage
    ]
    base = f"http://127.0.0.1:{port}"
    with run_until_stopped(cmd, os.environ, work / "prometheus.log", base + "/-/ready", 60, 20):
        yield base


def test_live_prometheus_keeps_exemplars_that_name_the_requests_trace(live_service, live_prometheus, receiver):
    """A traced request's latency bucket carries its trace id; Prometheus (with compose's exemplar
    storage) keeps it, and the trace itself reached the collector: Grafana's link works end to end."""
    import secrets

    import httpx

    trace_id = secrets.token_hex(16)
    headers = {"content-type": "image/png", "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    assert httpx.post(f"{live_service}/segment", content=png_bytes(), headers=headers, timeout=60).status_code == 200

    def exemplar_trace_ids() -> set[str]:
        now = time.time()
        r = httpx.get(
            live_prometheus + "/api/v1/query_exemplars",
            params={"query": "seg_request_duration_seconds_bucket", "start": now - 300, "end": now + 60},
            timeout=10,
        )
        return {e["labels"]["trace_id"] for series in r.json()["data"] for e in series["exemplars"]}

    wait_for(lambda: trace_id in exemplar_trace_ids(), 30, "Prometheus to store the request's exemplar")
    receiver.trace(bytes.fromhex(trace_id), 1, timeout=30)  # the trace the exemplar points to exists


def query(prom: str, expr: str) -> list[dict]:
    import httpx

    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


P99_OVER_BUDGET = (
    'histogram_quantile(0.99, sum by (le) (rate(seg_request_duration_seconds_bucket{code=~"2..|OK"}'
    "[1m]))) / scalar(max(seg_realtime_target_seconds))"
)


def test_live_prometheus_scrapes_the_service_and_evaluates_the_budget(live_service, live_prometheus, yaml):
    import math

    wait_for(
        lambda: [s for s in query(live_prometheus, 'up{job="bisenet-serve"}') if s["value"][1] == "1"],
        30,
        "Prometheus to scrape the service",
    )
    # traffic spread over several scrapes, so rate() sees the counters grow
    for _ in range(3):
        send_traffic(live_service, n=2)
        time.sleep(1.5)
    result = wait_for(lambda: query(live_prometheus, P99_OVER_BUDGET), 30, "the p99/budget ratio")
    ratio = float(result[0]["value"][1])
    assert math.isfinite(ratio) and ratio > 0, result
    budget = query(live_prometheus, "max(seg_realtime_target_seconds)")
    assert abs(float(budget[0]["value"][1]) - 1 / 30) < 1e-6
    # the shipped rules loaded and evaluate without errors
    import httpx

    groups = httpx.get(live_prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(rule_exprs(yaml))
    wait_for(
        lambda: all(
            r.get("lastEvaluation", "").startswith("20")
            for g in httpx.get(live_prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
            for r in g["rules"]
        ),
        20,
        "the rules to be evaluated",
    )
    groups = httpx.get(live_prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    unhealthy = {r["name"]: r.get("lastError") for g in groups for r in g["rules"] if r["health"] != "ok"}
    assert not unhealthy, unhealthy
    # every dashboard query runs against the live data; the core panels have data
    for where, expr in dashboard_exprs():
        query(live_prometheus, sub_grafana_vars(expr))
    for expr in (
        'sum by (model) (rate(seg_request_duration_seconds_count{model=~".*"}[1m]))',
        'histogram_quantile(0.99, sum by (le) (rate(seg_inference_seconds_bucket{model=~".*"}[1m])))',
        "sum by (reason) (rate(seg_requests_rejected_total[1m]))",
    ):
        assert query(live_prometheus, expr), expr
