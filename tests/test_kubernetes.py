"""The Kubernetes manifests (deploy/kubernetes), checked offline: no cluster can run here.

Each kustomization is rendered with `kubectl kustomize`; every built-in object passes
kubernetes-validate's strict schema check for a current Kubernetes; the custom resources
(ServiceMonitor, PodMonitor, InferenceService) and the prometheus-adapter rules, which have no
schema there, are checked for the fields their controllers need. The container's flags are parsed
by the service's own parser, the init container's command runs here, and every path, port and
metric the manifests name is checked against a live `python -m service`: its probes answer, and
the adapter's queries are parsed by promtool and evaluated by a real Prometheus scraping it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.servicekit import FAST_ARGS, ROOT, Service, free_port
from tests.test_deploy import exported_names, metric_names, parse_exposition, run_until_stopped

K8S_VERSION = "1.33.0"  # kubernetes-validate schemas: a current release
KUBE = ROOT / "deploy" / "kubernetes"
TARGETS = {
    "base": KUBE / "base",
    "gpu": KUBE / "overlays" / "gpu",
    "cpu": KUBE / "overlays" / "cpu",
    "kserve": KUBE / "kserve",
}
ADAPTER_VALUES = KUBE / "prometheus-adapter" / "values.yaml"
CUSTOM_GROUPS = ("monitoring.coreos.com/", "serving.kserve.io/")
VENV_BIN = Path(sys.executable).parent
SERVICE_ENV = ("BISENET_CACHE_DIR", "BISENET_WEIGHTS_MIRROR")  # read by model/checkpoint.py, not flags


# ------------------------------------------------------------------------------------------------
# tools


def ensure_tools() -> None:
    subprocess.run(["bash", str(ROOT / "tools" / "ensure_deploy_tools.sh"), str(VENV_BIN.parent)], timeout=280)
    importlib.invalidate_caches()


@pytest.fixture(scope="session")
def yaml():
    if importlib.util.find_spec("yaml") is None:
        ensure_tools()
    if importlib.util.find_spec("yaml") is None:
        pytest.skip("PyYAML is not installed and tools/ensure_deploy_tools.sh could not install it")
    import yaml

    return yaml


@pytest.fixture(scope="session")
def kv():
    """kubernetes_validate (schemas for every Kubernetes release, offline)."""
    if importlib.util.find_spec("kubernetes_validate") is None:
        ensure_tools()
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip("kubernetes-validate is not installed and tools/ensure_deploy_tools.sh could not install it")
    import kubernetes_validate

    return kubernetes_validate


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if not path:
        pytest.skip("kubectl is not installed: it renders the kustomizations (`kubectl kustomize`)")
    return path


def kustomize(kubectl: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)


def render(kubectl: str, yaml, path: Path) -> list[dict]:
    result = kustomize(kubectl, path)
    assert result.returncode == 0, f"kubectl kustomize {path}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def rendered(kubectl, yaml) -> dict[str, list[dict]]:
    return {name: render(kubectl, yaml, path) for name, path in TARGETS.items()}


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def where(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata'].get('name')}"


# ------------------------------------------------------------------------------------------------
# checks, as functions returning problems, so that broken overlays can be shown to fail them


def schema_problems(kv, docs: list[dict]) -> list[str]:
    """kubernetes-validate --strict for built-in kinds; required fields for the custom resources."""
    problems = []
    for doc in docs:
        if doc["apiVersion"].startswith(CUSTOM_GROUPS):
            problems += custom_resource_problems(doc)
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{where(doc)}: {path}: {exc.message}")
    return problems


DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def custom_resource_problems(doc: dict) -> list[str]:
    """What the Prometheus Operator and KServe need of their resources (their CRDs' required fields
    and the values this project relies on)."""
    kind, spec, problems = doc["kind"], doc.get("spec") or {}, []
    if not DNS_LABEL.fullmatch(doc["metadata"].get("name", "")):
        problems.append(f"{where(doc)}: metadata.name is not a DNS label")
    if kind in ("ServiceMonitor", "PodMonitor"):
        if doc["apiVersion"] != "monitoring.coreos.com/v1":
            problems.append(f"{where(doc)}: apiVersion must be monitoring.coreos.com/v1")
        if not isinstance(spec.get("selector"), dict) or not spec["selector"].get("matchLabels"):
            problems.append(f"{where(doc)}: spec.selector.matchLabels is required")
        key = "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
        endpoints = spec.get(key)
        if not isinstance(endpoints, list) or not endpoints:
            problems.append(f"{where(doc)}: spec.{key} must list at least one endpoint")
        for ep in endpoints or []:
            if not isinstance(ep.get("port"), str):
                problems.append(f"{where(doc)}: every endpoint needs a named port")
            if not str(ep.get("path", "/metrics")).startswith("/"):
                problems.append(f"{where(doc)}: endpoint path must start with /")
            for field in ("interval", "scrapeTimeout"):
                if field in ep and not re.fullmatch(r"(\d+(ms|s|m|h))+", str(ep[field])):
                    problems.append(f"{where(doc)}: {field} {ep[field]!r} is not a duration")
    elif kind == "InferenceService":
        if doc["apiVersion"] != "serving.kserve.io/v1beta1":
            problems.append(f"{where(doc)}: apiVersion must be serving.kserve.io/v1beta1")
        predictor = spec.get("predictor")
        if not isinstance(predictor, dict):
            return [*problems, f"{where(doc)}: spec.predictor is required"]
        containers = predictor.get("containers") or []
        main = [c for c in containers if c.get("name") == "kserve-container"]
        if len(main) != 1 or not main[0].get("image"):
            return [*problems, f"{where(doc)}: a custom predictor needs one container kserve-container with an image"]
        env = {e["name"]: e.get("value") for e in main[0].get("env", [])}
        if env.get("PROTOCOL") != "v2":
            problems.append(f"{where(doc)}: PROTOCOL=v2 tells KServe the container speaks the v2 protocol")
        if len(main[0].get("ports", [])) != 1:
            problems.append(f"{where(doc)}: KServe routes exactly one container port")
        for field in ("minReplicas", "maxReplicas"):
            if not isinstance(predictor.get(field, 1), int):
                problems.append(f"{where(doc)}: predictor.{field} must be an integer")
        mode = doc["metadata"].get("annotations", {}).get("serving.kserve.io/deploymentMode")
        if mode not in (None, "Serverless", "RawDeployment", "Standard"):
            problems.append(f"{where(doc)}: unknown deploymentMode {mode!r}")
    else:
        problems.append(f"{where(doc)}: a custom resource this test does not know how to check")
    return problems


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """os.environ with every BISENET_* variable replaced by `values` (restored afterwards)."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("BISENET_")]:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


QUANTITY = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|Ki|Mi|Gi|Ti)?", str(value))
    assert m, f"not a quantity: {value!r}"
    number, unit = float(m.group(1)), m.group(2) or ""
    return number / 1000 if unit == "m" else number * QUANTITY[unit]


def container_env(docs: list[dict], container: dict) -> dict[str, str]:
    """The environment a container gets from its ConfigMaps and env entries."""
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:  # Secrets hold no settings the manifests depend on
            env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def service_settings(docs: list[dict], container: dict):
    """The service's Settings for a container's args and environment, parsed by its own parser."""
    from service.config import ConfigError, load_settings

    env = {k: v for k, v in container_env(docs, container).items() if k.startswith("BISENET_")}
    usage = io.StringIO()
    with environment(env), contextlib.redirect_stderr(usage):
        try:
            return load_settings(container.get("args", [])), None
        except ConfigError as exc:
            return None, str(exc)
        except SystemExit:  # argparse: an unknown flag or a missing value
            return None, usage.getvalue().strip().splitlines()[-1]


def settings_env_problems(docs: list[dict]) -> list[str]:
    """Every BISENET_* variable in the settings ConfigMaps is one the service reads."""
    from service.config import build_parser

    known = set(re.findall(r"BISENET_[A-Z0-9_]+", build_parser().format_help())) | set(SERVICE_ENV)
    return [
        f"{where(cm)}: {key} is not a setting of the service"
        for cm in find(docs, "ConfigMap")
        for key in cm.get("data", {})
        if key.startswith("BISENET_") and key not in known
    ]


def probe(container: dict, kind: str) -> dict:
    return container.get(f"{kind}Probe") or {}


def pod_problems(docs: list[dict], pod: dict, main: dict, what: str) -> list[str]:
    """The pod-level promises: flags, ports, /dev/shm above the frame pool, grace above the drain,
    probes on the service's health paths, non-root, the weights volume where the cache is."""
    problems = []
    settings, error = service_settings(docs, main)
    if error:
        return [f"{what}: container args are not flags of `python -m service`: {error}"]
    ports = {p.get("name"): p["containerPort"] for p in main.get("ports", [])}
    if settings.http_port not in ports.values():
        problems.append(f"{what}: --http-port {settings.http_port} is not a container port {ports}")
    if "grpc" in ports and ports["grpc"] != settings.grpc_port:
        problems.append(f"{what}: port grpc {ports['grpc']} but --grpc-port {settings.grpc_port}")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in main.get("volumeMounts", [])}
    shm = volumes.get(mounts.get("/dev/shm"), {}).get("emptyDir")
    if not shm or shm.get("medium") != "Memory":
        problems.append(f"{what}: /dev/shm must be an emptyDir with medium Memory")
    else:
        size = quantity(shm.get("sizeLimit", 0))
        if size <= settings.shm_bytes:
            problems.append(f"{what}: /dev/shm sizeLimit {shm.get('sizeLimit')} is not above --shm-bytes")
        limit = main.get("resources", {}).get("limits", {}).get("memory")
        if not limit or quantity(limit) < size + 2**30:
            problems.append(f"{what}: memory limit {limit} must hold /dev/shm ({shm.get('sizeLimit')}) and the process")
    pre_stop = main.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= settings.drain_seconds + pre_stop:
        problems.append(
            f"{what}: terminationGracePeriodSeconds {grace} is not above the drain "
            f"({settings.drain_seconds:g} s) + preStop ({pre_stop} s)"
        )
    start, ready, live = probe(main, "startup"), probe(main, "readiness"), probe(main, "liveness")
    if start.get("periodSeconds", 10) * start.get("failureThreshold", 3) < 600:
        problems.append(f"{what}: the startup probe must allow 10 min for the download, warm-up and capture")
    if ready.get("httpGet", {}).get("path") not in ("/readyz", "/v2/health/ready"):
        problems.append(f"{what}: readiness must be /readyz")
    if live.get("httpGet", {}).get("path") not in ("/healthz", "/v2/health/live"):
        problems.append(f"{what}: liveness must be /healthz")
    for p in (start, ready, live):
        port = p.get("httpGet", {}).get("port")
        if port not in (settings.http_port, *[n for n, v in ports.items() if v == settings.http_port]):
            problems.append(f"{what}: a probe uses port {port!r}, not the HTTP port")
    security = pod.get("securityContext", {})
    if security.get("runAsNonRoot") is not True or security.get("runAsUser", 0) == 0:
        problems.append(f"{what}: the pod must run as a non-root user")
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
            problems.append(f"{what}: container {c['name']} must set allowPrivilegeEscalation: false")
    cache = container_env(docs, main).get("BISENET_CACHE_DIR", "")
    weights = [m for m in main.get("volumeMounts", []) if cache.startswith(m["mountPath"] + "/")]
    if not weights:
        problems.append(f"{what}: BISENET_CACHE_DIR {cache!r} is not on a mounted volume")
    return problems


def deployment_problems(docs: list[dict]) -> list[str]:
    """The base/overlay objects fit together: pod promises, selectors, ports, HPA, PDB, monitor."""
    deployment = one(docs, "Deployment", "bisenet-serve")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    main = next((c for c in pod["containers"] if c["name"] == "segmentation"), None)
    if main is None:
        return ["Deployment/bisenet-serve: no container named segmentation"]
    problems = pod_problems(docs, pod, main, "Deployment/bisenet-serve") + settings_env_problems(docs)

    def selects(selector: dict) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    if not selects(deployment["spec"]["selector"]["matchLabels"]):
        problems.append("Deployment: its selector does not match its pod labels")
    fetch = [c for c in pod.get("initContainers", []) if c["name"] == "fetch-weights"]
    if not fetch or fetch[0].get("envFrom") != main.get("envFrom"):
        problems.append("Deployment: the fetch-weights init container must read the service's settings")
    elif {m["name"] for m in fetch[0]["volumeMounts"]} & {m["name"] for m in main["volumeMounts"]} == set():
        problems.append("Deployment: the init container and the service share no weights volume")
    ports = {p["name"]: p for p in main["ports"]}
    services = find(docs, "Service")
    for svc in services:
        if not selects(svc["spec"]["selector"]):
            problems.append(f"{where(svc)}: its selector matches no pod of the Deployment")
        for p in svc["spec"]["ports"]:
            if p.get("targetPort") not in ports:
                problems.append(f"{where(svc)}: targetPort {p.get('targetPort')!r} is not a named container port")
    main_svc = next((s for s in services if s["metadata"]["name"] == "bisenet-serve"), None)
    if main_svc is None or {p["name"] for p in main_svc["spec"]["ports"]} != {"http", "grpc"}:
        problems.append("Service/bisenet-serve must expose the http and grpc ports")
    pdb = one(docs, "PodDisruptionBudget")
    if not selects(pdb["spec"]["selector"]["matchLabels"]):
        problems.append("PodDisruptionBudget: its selector matches no pod")
    hpa = one(docs, "HorizontalPodAutoscaler")
    if hpa["spec"]["scaleTargetRef"]["name"] != "bisenet-serve":
        problems.append("HorizontalPodAutoscaler: it scales something else than the Deployment")
    if hpa["spec"].get("minReplicas", 1) <= pdb["spec"].get("maxUnavailable", 0):
        problems.append("HorizontalPodAutoscaler: minReplicas must stay above the PDB's maxUnavailable")
    policy = one(docs, "NetworkPolicy")
    allowed = {p["port"] for rule in policy["spec"].get("ingress", []) for p in rule.get("ports", [])}
    if not selects(policy["spec"]["podSelector"]["matchLabels"]) or not {"http", "grpc"} <= allowed:
        problems.append("NetworkPolicy: it must select the pods and let the http and grpc ports in")
    monitor = one(docs, "ServiceMonitor")
    scraped = [
        s
        for s in services
        if all(s["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    ]
    scraped_ports = {p["name"] for s in scraped for p in s["spec"]["ports"]}
    for ep in monitor["spec"]["endpoints"]:
        if ep["port"] not in scraped_ports:
            problems.append(f"ServiceMonitor: port {ep['port']!r} is on no Service it selects")
    return problems


def check_all(kv, docs: list[dict]) -> list[str]:
    return schema_problems(kv, docs) + deployment_problems(docs)


# ------------------------------------------------------------------------------------------------
# the rendered manifests


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_rendered_document_validates(target, rendered, kv):
    docs = rendered[target]
    assert docs
    problems = schema_problems(kv, docs)
    assert not problems, "\n".join(problems)
    # the strict mode is what catches misspelt fields; make sure it is on in this version
    with pytest.raises(kv.ValidationError):
        kv.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dat": {}}, K8S_VERSION, True)


@pytest.mark.parametrize("target", ["base", "gpu", "cpu"])
def test_deployment_objects_fit_together(target, rendered):
    problems = deployment_problems(rendered[target])
    assert not problems, "\n".join(problems)


def test_base_holds_what_an_operator_expects(rendered):
    kinds = {d["kind"] for d in rendered["base"]}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "ConfigMap",
        "ServiceAccount",
        "Namespace",
    } <= kinds
    assert all(d["metadata"].get("namespace") == "bisenet-serve" for d in rendered["base"] if d["kind"] != "Namespace")


def test_overlays_differ_in_the_device(rendered):
    def pod_and_env(docs):
        deployment = one(docs, "Deployment")
        main = deployment["spec"]["template"]["spec"]["containers"][0]
        return main, container_env(docs, main)

    gpu, gpu_env = pod_and_env(rendered["gpu"])
    cpu, cpu_env = pod_and_env(rendered["cpu"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_env["BISENET_DEVICE"] == "cuda", "no silent CPU fallback on a pod without a GPU"
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert cpu_env["BISENET_DEVICE"] == "cpu"
    settings, error = service_settings(rendered["cpu"], cpu)
    assert error is None and settings.models[0].name == "bisenetv1_r18" and settings.target_fps == 2


def test_kserve_inference_service_is_a_v2_custom_predictor(rendered):
    docs = rendered["kserve"]
    isvc = one(docs, "InferenceService")
    predictor = isvc["spec"]["predictor"]
    main = predictor["containers"][0]
    problems = custom_resource_problems(isvc) + pod_problems(docs, predictor, main, "InferenceService")
    assert not problems, "\n".join(problems)
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    # KServe makes no autoscaler; ours scales the Deployment it makes, <name>-predictor
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == isvc["metadata"]["name"] + "-predictor"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
    monitor = one(docs, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "bisenet-serve"}
    assert {ep["port"] for ep in monitor["spec"]["podMetricsEndpoints"]} == {p["name"] for p in main["ports"]}
    # the ConfigMap keeps the name the InferenceService refers to
    one(docs, "ConfigMap", main["envFrom"][0]["configMapRef"]["name"])
    # the same weights fetcher as the Deployment's (whose command runs in a test below), on the
    # volume the service reads
    fetch = predictor["initContainers"][0]
    deployment_fetch = init_container(rendered["gpu"])[0]
    assert fetch["name"] == "fetch-weights" and fetch["command"] == deployment_fetch
    assert fetch["envFrom"] == main["envFrom"] and fetch["image"] == main["image"]
    assert {m["name"] for m in fetch["volumeMounts"]} <= {m["name"] for m in main["volumeMounts"]}


# ------------------------------------------------------------------------------------------------
# broken overlays fail


def deployment_patch(body: str) -> str:
    return (
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: bisenet-serve\nspec:\n"
        + "\n".join("  " + line for line in body.strip("\n").splitlines())
        + "\n"
    )


ARGS = ["--host=0.0.0.0", "--http-port=8000", "--grpc-port=50051", "--shm-bytes=1073741824", "--drain-seconds=30"]


def args_patch(args: list[str]) -> str:
    listed = "\n".join(f"        - {a}" for a in args)
    return deployment_patch(f"template:\n  spec:\n    containers:\n      - name: segmentation\n        args:\n{listed}")


BAD_OVERLAYS = {
    "replicas of the wrong type": (deployment_patch("replicas: two"), r"replicas.*'two'"),
    "a misspelt field": (
        deployment_patch("template:\n  spec:\n    terminationGracePeriodSecond: 60"),
        r"terminationGracePeriodSecond",
    ),
    "a probe on another port": (
        deployment_patch(
            "template:\n  spec:\n    containers:\n      - name: segmentation\n        livenessProbe:\n"
            "          httpGet:\n            port: 8080"
        ),
        r"a probe uses port 8080",
    ),
    "/dev/shm below the frame pool": (
        deployment_patch(
            "template:\n  spec:\n    volumes:\n      - name: dshm\n        emptyDir:\n"
            "          medium: Memory\n          sizeLimit: 512Mi"
        ),
        r"/dev/shm sizeLimit 512Mi",
    ),
    "a flag the service does not have": (
        args_patch([*ARGS, "--max-batches=4"]),
        r"unrecognized arguments: --max-batches=4",
    ),
    "a malformed setting": (args_patch([*ARGS, "--max-batch=eight"]), r"max-batch.*eight"),
    "a grace period under the drain": (
        deployment_patch("template:\n  spec:\n    terminationGracePeriodSeconds: 20"),
        r"terminationGracePeriodSeconds 20",
    ),
    "an unknown setting in the ConfigMap": (
        "---\n",  # no patch: the ConfigMap below
        r"BISENET_MAX_BATCHES is not a setting",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_OVERLAYS))
def test_an_overlay_with_a_bad_value_fails(case, kubectl, yaml, kv, tmp_path):
    patch, expected = BAD_OVERLAYS[case]
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUBE, tree)
    bad = tree / "overlays" / "bad"
    bad.mkdir()
    kustomization = {"resources": ["../gpu"]}
    if patch.strip() != "---":
        (bad / "patch.yaml").write_text(patch)
        kustomization["patches"] = [{"path": "patch.yaml"}]
    else:
        kustomization["configMapGenerator"] = [
            {"name": "bisenet-serve-settings", "behavior": "merge", "literals": ["BISENET_MAX_BATCHES=4"]}
        ]
    (bad / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    problems = check_all(kv, render(kubectl, yaml, bad))
    assert problems, f"{case}: accepted"
    assert any(re.search(expected, p) for p in problems), problems


def doc_overlay_files() -> dict[str, str]:
    """The files of the `my-overlay/` example in docs/scaling.md, by name."""
    files = {}
    for block in re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "scaling.md").read_text(), re.S):
        block = textwrap.dedent(block)
        m = re.match(r"# my-overlay/([\w.-]+)", block)
        if m:
            files[m.group(1)] = block
    return files


def test_the_overlay_in_the_docs_renders_and_passes(kubectl, yaml, kv, tmp_path):
    """docs/scaling.md's own overlay (image, settings, API key from a Secret, weights on a PVC)."""
    files = doc_overlay_files()
    assert {"kustomization.yaml", "api-key.yaml", "weights-pvc.yaml"} <= set(files)
    shutil.copytree(KUBE, tmp_path / "deploy" / "kubernetes")
    overlay = tmp_path / "my-overlay"
    overlay.mkdir()
    for name, text in files.items():
        (overlay / name).write_text(text)
    kustomization = yaml.safe_load(files["kustomization.yaml"])
    kustomization["patches"].append({"path": "weights-pvc.yaml"})  # "add it under patches:"
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    docs = render(kubectl, yaml, overlay)
    assert not check_all(kv, docs), check_all(kv, docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    main = pod["containers"][0]
    assert main["image"] == "registry.example.com/bisenet-serve:0.1.0"
    secret = one(docs, "Secret")
    assert secret["metadata"]["namespace"] == "bisenet-serve"
    key = next(e for e in main["env"] if e["name"] == "BISENET_API_KEY")
    assert key["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"], "the generated name is referred to"
    weights = next(v for v in pod["volumes"] if v["name"] == "weights")
    assert weights == {"name": "weights", "persistentVolumeClaim": {"claimName": "bisenet-weights"}}
    assert container_env(docs, main)["BISENET_WEIGHTS_MIRROR"] == "https://mirror.internal/bisenet"


# ------------------------------------------------------------------------------------------------
# the init container's command, run here


def init_container(docs: list[dict]) -> tuple[list[str], dict[str, str]]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    fetch = next(c for c in pod["initContainers"] if c["name"] == "fetch-weights")
    return fetch["command"], container_env(docs, fetch)


def run_init(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    assert command[0] == "python"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BISENET_")}
    return subprocess.run(
        [sys.executable, *command[1:]], env={**clean, **env}, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_init_container_fetches_into_the_cache_and_stops_on_a_missing_file(rendered, tmp_path):
    from model.zoo import default_entry

    command, env = init_container(rendered["gpu"])
    assert env["BISENET_MODELS"] == "bisenetv1_r18,bisenetv1_r50"
    filenames = [default_entry(m).filename for m in env["BISENET_MODELS"].split(",")]
    cache, mirror = tmp_path / "cache", tmp_path / "mirror"
    mirror.mkdir()
    env = {**env, "BISENET_CACHE_DIR": str(cache), "BISENET_WEIGHTS_MIRROR": str(mirror)}

    # an empty mirror: the pod stops here, naming the file and where it looked
    result = run_init(command, env)
    assert result.returncode != 0
    assert filenames[0] in result.stderr and str(mirror) in result.stderr, result.stderr[-2000:]
    assert not cache.exists() or not any(cache.iterdir()), "nothing half-written is left in the cache"

    # a file that is not the official one (wrong sha256): refused and discarded
    (mirror / filenames[0]).write_bytes(b"not the checkpoint")
    result = run_init(command, env)
    assert result.returncode != 0 and "does not match" in result.stderr, result.stderr[-2000:]
    assert not (cache / filenames[0]).exists()

    # checkpoints already in the cache (a shared volume, a restarted pod): nothing to fetch
    cache.mkdir(exist_ok=True)
    for name in filenames:
        (cache / name).write_bytes(b"cached")
    result = run_init(command, env)
    assert result.returncode == 0, result.stderr[-2000:]
    for model, name in zip(env["BISENET_MODELS"].split(","), filenames):
        assert f"weights for {model}: {cache / name}" in result.stdout


# ------------------------------------------------------------------------------------------------
# metrics: the adapter rules, the HPAs and a live service


def adapter_rules(yaml) -> list[dict]:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    assert values["rules"]["default"] is False, "only the service's rules: the defaults add hundreds of series"
    return values["rules"]["custom"]


def adapter_rule_problems(rule: dict) -> list[str]:
    """prometheus-adapter's required fields: a series query, resources mapping namespace and pod, a
    name and a metrics query using its templates."""
    problems = []
    series = metric_names(rule.get("seriesQuery", ""))
    if len(series) != 1:
        problems.append(f"seriesQuery {rule.get('seriesQuery')!r} must name one metric")
    overrides = rule.get("resources", {}).get("overrides", {})
    if overrides.get("namespace") != {"resource": "namespace"} or overrides.get("pod") != {"resource": "pod"}:
        problems.append("resources.overrides must map the namespace and pod labels (Pods metrics)")
    name = rule.get("name", {})
    if not name.get("as") or (name.get("matches") and not re.search(name["matches"], next(iter(series), ""))):
        problems.append(f"name {name} must match the series and say what it is served as")
    query = rule.get("metricsQuery", "")
    for template in ("<<.LabelMatchers>>", "<<.GroupBy>>"):
        if template not in query:
            problems.append(f"metricsQuery must use {template} (per-pod values)")
    return problems


def adapter_query(rule: dict, namespace: str, pod: str) -> str:
    """A rule's metricsQuery as the adapter sends it for one pod."""
    series = next(iter(metric_names(rule["seriesQuery"])))
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", f'namespace="{namespace}",pod=~"{pod}"')
        .replace("<<.GroupBy>>", "pod")
    )


def test_adapter_rules_have_what_the_adapter_needs(yaml):
    rules = adapter_rules(yaml)
    assert rules
    for rule in rules:
        assert not adapter_rule_problems(rule), adapter_rule_problems(rule)
    # and the check sees a broken one
    broken = dict(rules[0], metricsQuery="sum(seg_queue_depth)", resources={})
    assert len(adapter_rule_problems(broken)) == 3


@pytest.mark.parametrize("target", ["base", "kserve"])
def test_every_hpa_metric_is_served_by_an_adapter_rule(target, rendered, yaml):
    served = {r["name"]["as"] for r in adapter_rules(yaml)}
    hpa = one(rendered[target], "HorizontalPodAutoscaler")
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert names and set(names) <= served, set(names) - served
    assert {"seg_queue_depth", "seg_request_p99_budget_ratio"} <= set(names)


def need_tool(name: str) -> str:
    """promtool or prometheus: on PATH or in the virtual environment (installed when missing)."""
    path = shutil.which(name) or str(VENV_BIN / name)
    if not Path(path).exists():
        ensure_tools()
    if not Path(path).exists():
        pytest.skip(f"{name} is not installed and tools/ensure_deploy_tools.sh could not install it")
    return path


def test_adapter_queries_give_each_pod_its_value(yaml, tmp_path):
    """promtool unit test of the adapter queries, as the adapter sends them for two pods: a busy
    one (queue of 5; p99 at 1.98 budgets) and an idle one, which must read 0, not NaN (an HPA that
    cannot read a metric never scales down)."""
    promtool = need_tool("promtool")
    rules = adapter_rules(yaml)
    recorded = {r["name"]["as"]: f"adapter:{r['name']['as']}" for r in rules}
    group = [
        {"record": recorded[r["name"]["as"]], "expr": adapter_query(r, "bisenet-serve", "busy|idle")} for r in rules
    ]
    (tmp_path / "adapter_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": group}]}))
    ns = 'namespace="bisenet-serve"'
    series = [
        (f'seg_queue_depth{{{ns},pod="busy",model="a"}}', "3x10"),
        (f'seg_queue_depth{{{ns},pod="busy",model="b"}}', "2x10"),
        (f'seg_queue_depth{{{ns},pod="idle",model="a"}}', "0x10"),
        ('seg_queue_depth{namespace="elsewhere",pod="busy",model="a"}', "9x10"),
    ]
    for pod in ("busy", "idle"):
        series.append((f'seg_realtime_target_seconds{{{ns},pod="{pod}"}}', "0.05x10"))
        # per minute: 50 requests under the 50 ms budget, 50 more under 100 ms (busy); none (idle)
        for le, per_minute in (("0.05", 50), ("0.1", 100), ("+Inf", 100)):
            rate = per_minute if pod == "busy" else 0
            name = f'seg_request_duration_seconds_bucket{{{ns},pod="{pod}",model="a",protocol="http",code="200",le="{le}"}}'
            series.append((name, f"0+{rate}x10"))
    tests = {
        "rule_files": ["adapter_rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "promql_expr_test": [
                    {
                        "expr": recorded["seg_queue_depth"],
                        "eval_time": "10m",
                        "exp_samples": [
                            {"labels": f'{recorded["seg_queue_depth"]}{{pod="{p}"}}', "value": v}
                            for p, v in (("busy", 5), ("idle", 0))
                        ],
                    },
                    {
                        "expr": recorded["seg_request_p99_budget_ratio"],
                        "eval_time": "10m",
                        "exp_samples": [
                            {"labels": f'{recorded["seg_request_p99_budget_ratio"]}{{pod="{p}"}}', "value": v}
                            for p, v in (("busy", 1.98), ("idle", 0))
                        ],
                    },
                ],
            }
        ],
    }
    (tmp_path / "adapter_test.yml").write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [promtool, "test", "rules", "adapter_test.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def photo_jpeg() -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((128, 128)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def live_service():
    """`python -m service` (random R18 weights, CPU, loopback) after a few real requests."""
    service = Service(["--model", "bisenetv1_r18=random", *FAST_ARGS]).wait_ready()
    try:
        image = photo_jpeg()
        with httpx.Client(base_url=service.url, timeout=60) as client:
            for fmt in ("png", "json", "png"):
                r = client.post("/segment", params={"format": fmt}, files={"image": ("a.jpg", image, "image/jpeg")})
                assert r.status_code == 200, r.text
            assert (
                client.post("/segment", files={"image": ("a.jpg", b"\xff\xd8 broken", "image/jpeg")}).status_code == 400
            )
        yield service
    finally:
        service.stop()


def test_every_metric_the_manifests_name_is_exported_by_a_live_service(live_service, yaml, rendered):
    families, sampled = parse_exposition(live_service.metrics())
    exported = exported_names(families)
    for rule in adapter_rules(yaml):
        named = metric_names(rule["seriesQuery"]) | metric_names(adapter_query(rule, "ns", "p"))
        assert named <= exported, f"not in /metrics: {named - exported}"
        # the series the adapter discovers pods by has samples once requests were served
        assert metric_names(rule["seriesQuery"]) <= sampled
    for target in ("base", "kserve"):
        for monitor in find(rendered[target], "ServiceMonitor") + find(rendered[target], "PodMonitor"):
            for ep in monitor["spec"].get("endpoints", []) + monitor["spec"].get("podMetricsEndpoints", []):
                r = httpx.get(live_service.url + ep.get("path", "/metrics"), timeout=10)
                assert r.status_code == 200 and "seg_queue_depth" in r.text


@pytest.mark.parametrize("target", ["gpu", "kserve"])
def test_probe_paths_answer_on_a_live_service(target, live_service, rendered):
    docs = rendered[target]
    pods = [d["spec"]["template"]["spec"] for d in find(docs, "Deployment")]
    pods += [d["spec"]["predictor"] for d in find(docs, "InferenceService")]
    paths = {
        probe(c, k)["httpGet"]["path"]
        for pod in pods
        for c in pod["containers"]
        for k in ("startup", "readiness", "liveness")
    }
    assert len(paths) >= 2
    for path in sorted(paths):
        r = httpx.get(live_service.url + path, timeout=10)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"


def test_prometheus_evaluates_the_adapter_queries_against_a_live_service(live_service, yaml, tmp_path):
    """A real Prometheus scrapes the live service with the labels the Prometheus Operator adds
    (namespace, pod); each adapter query, as the adapter sends it, returns one number for the pod."""
    prometheus = need_tool("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {
                "job_name": "bisenet-serve",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{live_service.http_port}"],
                        "labels": {"namespace": "bisenet-serve", "pod": "bisenet-serve-0"},
                    }
                ],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    cmd = [
        prometheus,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    base = f"http://127.0.0.1:{port}"
    image = photo_jpeg()
    with run_until_stopped(cmd, dict(os.environ), tmp_path / "prometheus.log", base + "/-/ready", 60, 20):
        values = {}
        deadline = time.monotonic() + 60
        # until the rate window holds two scrapes with traffic (the ratio reads 0 before)
        while time.monotonic() < deadline and not values.get("seg_request_p99_budget_ratio"):
            # traffic across several scrapes, so that rate() sees the counters grow
            httpx.post(live_service.url + "/segment", files={"image": ("a.jpg", image, "image/jpeg")}, timeout=60)
            for rule in adapter_rules(yaml):
                query = adapter_query(rule, "bisenet-serve", "bisenet-serve-0")
                body = httpx.get(base + "/api/v1/query", params={"query": query}, timeout=10).json()
                assert body["status"] == "success", body
                result = body["data"]["result"]
                if result:
                    assert [s["metric"] for s in result] == [{"pod": "bisenet-serve-0"}], result
                    values[rule["name"]["as"]] = float(result[0]["value"][1])
            time.sleep(0.5)
    assert set(values) == {r["name"]["as"] for r in adapter_rules(yaml)}, f"no value for some rule: {values}"
    assert values["seg_queue_depth"] >= 0
    # random weights on a 2-core CPU: far over the 33 ms budget, which is the point of the ratio
    assert values["seg_request_p99_budget_ratio"] > 0
