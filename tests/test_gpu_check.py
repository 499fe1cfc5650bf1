"""tools/gpu_check.sh --dry-run: the prepared GPU check lists its steps, and every command in it
parses with the flags this checkout's entry points accept (so it cannot rot between GPU runs)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


@pytest.fixture(scope="module")
def steps() -> dict[str, tuple[int, str]]:
    run = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--python", sys.executable],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    found = {}
    for line in run.stdout.splitlines():
        if line.startswith("STEP\t"):
            _, name, timeout, command = line.split("\t", 3)
            found[name] = (int(timeout), command)
    return found


def help_text(argv: list[str]) -> str:
    from service.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return out.getvalue()


def bisenet_args(command: str) -> list[str]:
    tokens = shlex.split(command)
    assert tokens[:3] == [sys.executable, "-m", "service.cli"], command
    return tokens[3:]


def test_step_list(steps):
    names = list(steps)
    assert names[:5] == ["environment", "install", "gpu-tests", "model-bench", "model-compile"]
    # training before the optional adaptive run, which a tight budget skips first
    assert names[-4:] == ["train-data", "train-r18", "train-r50", "service-grpc-batching-adaptive"]
    assert {"streams-30fps", "service-grpc-batching-adaptive", "decode-nvjpeg", "labels-memory"} <= set(names)
    assert "tests/test_gpu_service.py" in steps["gpu-tests"][1] and " -m gpu " in steps["gpu-tests"][1]
    services = [n for n in names if n.startswith("service-")]
    assert {n.split("-")[1] for n in services} == {"rest", "grpc"}
    # both decode modes whatever python runs the dry run (steps were once dropped when it lacked torch)
    assert {f"service-{p}-decode-{m}" for p in ("rest", "grpc") for m in ("frontend", "worker")} <= set(services)
    assert all(timeout <= 300 for timeout, _ in steps.values())


def test_dry_run_runs_nothing_and_default_budget_fits(tmp_path):
    report = tmp_path / "report.md"
    run = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--report", str(report)], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0 and not report.exists()
    assert re.search(r"^BUDGET=(\d+)$", SCRIPT.read_text(), re.M).group(1) == "450"  # + at most 30 s: 8 minutes
    bad = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_model_bench_commands_parse(steps):
    from model import bench

    for name in ("model-bench", "model-compile"):
        argv = bisenet_args(steps[name][1])
        assert argv[:2] == ["bench", "model"]
        args = bench.build_parser().parse_args(argv[2:])
        assert (args.height, args.width) == (1024, 2048)
    full = bench.build_parser().parse_args(bisenet_args(steps["model-bench"][1])[2:])
    assert full.models == ["bisenetv1_r18", "bisenetv1_r50"] and full.batches == [1, 4, 8, 16]
    assert {"eager", "graphs", "batch", "fp16", "bf16"} <= set(full.variants) and full.agreement


def test_service_bench_commands_parse(steps):
    from service.config import load_settings

    flags = set(re.findall(r"--[a-z][a-z-]*", help_text(["bench", "service"])))
    for name, (_, command) in steps.items():
        if not (name.startswith("service-") or name == "streams-30fps"):
            continue
        argv = bisenet_args(command)
        assert argv[:2] == ["bench", "service"]
        spawn = shlex.split(argv[argv.index("--spawn") + 1])
        used = {a for a in argv[2:] if a.startswith("--") and " " not in a}
        assert used <= flags, used - flags
        settings = load_settings(spawn)
        assert settings.devices == ("cuda:0",) and settings.warm_shapes == ((1024, 2048),)
        assert "--size" in argv and argv[argv.index("--size") + 1] == "1024x2048"
    adaptive = bisenet_args(steps["service-grpc-batching-adaptive"][1])
    assert load_settings(shlex.split(adaptive[adaptive.index("--spawn") + 1])).batching == "adaptive"
    assert "--target-fps" in steps["streams-30fps"][1] and "30" in bisenet_args(steps["streams-30fps"][1])


def test_training_commands_parse(steps, capsys):
    from model.training.train import main as train_main

    for arch in ("r18", "r50"):
        argv = bisenet_args(steps[f"train-{arch}"][1])
        assert argv[0] == "train"
        assert train_main([*argv[1:], "--print-config"]) == 0
        config = capsys.readouterr().out
        assert f'"arch": "bisenetv1_{arch}"' in config and '"batch_size": 4' in config


def test_training_data_tool_writes_a_dataset(steps, tmp_path):
    argv = shlex.split(steps["train-data"][1])
    assert argv[1] == "tools/synthetic_train_data.py"
    run = subprocess.run([sys.executable, argv[1], str(tmp_path), "--count", "1"], cwd=ROOT, capture_output=True)
    assert run.returncode == 0, run.stderr
    from model.training.data import cityscapes_samples, detect_layout, read_label

    assert detect_layout(tmp_path) == "cityscapes"
    (sample,) = cityscapes_samples(tmp_path, "train")
    labels = read_label(sample.label)
    assert labels.shape == (1024, 2048) and labels.max() <= 18  # train ids, as the step trains on


def requirement_name(line: str) -> str:
    return re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_every_runtime_dependency_reaches_the_gpu_machine(steps):
    """The GPU machine installs offline from tools/gpu_wheels.txt: each runtime dependency of the
    package is either listed there or named there as already in the GPU image (httptools once
    slipped through: the front end would not have started)."""
    import tomllib

    listed, in_image = set(), set()
    for line in (ROOT / "tools" / "gpu_wheels.txt").read_text().splitlines():
        if line.startswith("# in-image:"):
            in_image = {requirement_name(n) for n in line.removeprefix("# in-image:").split()}
        elif line.strip() and not line.startswith("#"):
            listed.add(requirement_name(line))
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = {requirement_name(d) for d in dependencies} - listed - in_image
    assert not missing, f"add to tools/gpu_wheels.txt (or its in-image line): {sorted(missing)}"
    assert in_image and not listed & in_image
    assert "-r tools/gpu_wheels.txt" in steps["install"][1] and "--no-index" in steps["install"][1]
    assert "-r tools/gpu_wheels.txt" in (ROOT / "tools" / "prefetch_gpu_wheels.sh").read_text()


def test_the_gpu_tests_step_selects_the_gpu_tests(steps):
    """`-m gpu` selects by the mark: a test skipped without CUDA but not marked would not run there."""
    command = shlex.split(steps["gpu-tests"][1])
    run = subprocess.run([*command, "--collect-only"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    collected = [line for line in run.stdout.splitlines() if "::" in line]
    assert len(collected) >= 8, run.stdout
    assert any(line.startswith("tests/test_gpu_service.py::") for line in collected)


def test_decode_bench_command_parses(steps):
    flags = set(re.findall(r"--[a-z][a-z-]*", help_text(["bench", "decode"])))
    argv = bisenet_args(steps["decode-nvjpeg"][1])
    assert argv[:2] == ["bench", "decode"]
    assert {a for a in argv[2:] if a.startswith("--")} <= flags
    assert argv[argv.index("--weights") + 1] == "random"  # the GPU machine has no network


def test_labels_memory_step_runs_here_on_a_small_image(steps):
    command = steps["labels-memory"][1].replace("--device cuda", "--device cpu").replace("4096x4096", "300x400")
    argv = shlex.split(command)
    assert argv[:2] == [sys.executable, "tools/bench_labels.py"]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "labels identical across budgets: yes" in run.stdout, run.stdout + run.stderr


@pytest.mark.parametrize("script", ["gpu_check.sh", "prefetch_gpu_wheels.sh"])
def test_help_prints_the_whole_header_and_no_code(script):
    path = ROOT / "tools" / script
    run = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=30)
    lines = path.read_text().splitlines()[1:]
    header = lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    assert run.returncode == 0 and run.stdout.count("\n") >= 6
    assert header[-1].lstrip("# ") in run.stdout and "set -" not in run.stdout
