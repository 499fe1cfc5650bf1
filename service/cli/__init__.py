"""`bisenet`: one command for the service, its clients, training and tools.

Each subcommand is a module's `main(argv)`, imported only when it runs, so `bisenet segment --url`
never loads torch and `bisenet --help` answers at once.
"""

from __future__ import annotations

import importlib
import sys

from .. import __version__

# name -> (module, function, one line for `bisenet --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("service.cli", "serve_main", "start the service (REST, gRPC, workers), or deploy it on Ray with --ray"),
    "segment": ("service.cli.segment", "segment_main", "segment images, in this process or with a running service"),
    "stream": ("service.cli.stream", "main", "stream a video, image folder or camera over gRPC"),
    "models": ("service.cli.segment", "models_main", "list the model zoo, or the models a service serves"),
    "train": ("model.training.train", "main", "train BiSeNetV1 with the mmsegmentation recipe (torchrun for GPUs)"),
    "evaluate": ("model.training.evaluate", "main", "mIoU of a checkpoint, single-scale or multi-scale + flip"),
    "prepare-cityscapes": ("model.training.cityscapes", "main", "write Cityscapes train-id label files"),
    "check-data": ("model.training.data", "check_main", "run the dataset checks training runs first"),
    "export": ("model.export", "main", "write an ONNX file"),
    "bench": (
        "service.cli",
        "bench_main",
        "benchmarks: `bench model` (engine), `bench service` (load), `bench menu` (tta), `bench peers`, `bench decode`, `bench priority`",
    ),
}

BENCHES: dict[str, tuple[str, str, str]] = {
    "model": ("model.bench", "main", "engine images/s and latency per optimisation, label agreement"),
    "service": ("service.bench.cli", "main", "load sweeps over REST/gRPC, streams, the raw engine beside"),
    "menu": ("model.bench_menu", "main", "latency per model and tta mode beside the published mIoU (model=auto)"),
    "peers": ("service.bench.peers", "main", "the same engine under Triton (PyTriton), Ray Serve and this service"),
    "decode": ("service.bench.decode", "main", "worker-side (nvJPEG) against front-end decoding: labels, time"),
    "priority": ("service.bench.priority", "main", "live frames' latency under a background flood, with priorities"),
}


def usage(prog: str, commands: dict[str, tuple[str, str, str]]) -> str:
    width = max(map(len, commands))
    lines = [f"usage: {prog} COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in commands.items()]
    lines += ["", f"`{prog} COMMAND --help` shows the options of each."]
    return "\n".join(lines)


def dispatch(prog: str, commands: dict[str, tuple[str, str, str]], argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(prog, commands))
        return 0
    if argv[0] == "--version":
        print(f"bisenet-serve {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"{prog}: unknown command {name!r}\n\n{usage(prog, commands)}", file=sys.stderr)
        return 2
    module, function, _ = commands[name]
    result = getattr(importlib.import_module(module), function)(rest)
    return int(result or 0)


def serve_main(argv: list[str]) -> int:
    """`bisenet serve`: this host's service, or with `--ray ADDRESS` the Ray Serve application."""
    for i, arg in enumerate(argv):
        if arg == "--ray" or arg.startswith("--ray="):
            address = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            rest = argv[:i] + argv[i + (1 if "=" in arg else 2) :]
            from service.ray.__main__ import main as ray_main

            return ray_main(["--address", address, *rest] if address else rest)
    if any(a in ("-h", "--help") for a in argv):
        from service.config import build_parser

        parser = build_parser()
        parser.epilog = (
            "--ray ADDRESS deploys the service on the Ray cluster at ADDRESS instead (docs/ray.md; "
            "the Ray flags: python -m service.ray --help)."
        )
        parser.parse_args(argv)  # prints the help and exits 0
    from service.__main__ import main as serve

    return serve(argv)


def bench_main(argv: list[str]) -> int:
    return dispatch("bisenet bench", BENCHES, argv)


def main(argv: list[str] | None = None) -> int:
    return dispatch("bisenet", COMMANDS, sys.argv[1:] if argv is None else argv)
