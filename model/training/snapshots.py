"""Training checkpoints in mmsegmentation's layout, written atomically, and the weights a run
starts from (ImageNet backbone, a model to fine-tune, or a run to resume).

A checkpoint is {'meta', 'state_dict', 'optimizer', 'train_state'[, 'scaler']}:
- `state_dict`: the official key names (no `module.` prefix), auxiliary heads included, as mmseg
  saves them; mmseg 1.x and `Segmenter` load it unchanged.
- `meta`: CLASSES and PALETTE (what mmseg 0.x writes and 1.x's `init_model` reads), the same as
  `dataset_meta` (1.x), plus arch, iter, config (JSON), seed, time and env_info.
- `optimizer` (SGD momentum buffers), `scaler` (fp16 loss scale) and `train_state` (iteration,
  schedule, batch layout) make a resumed run continue exactly.
Everything is plain tensors and containers, so `torch.load(weights_only=True)` reads it.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, num_classes_of, read_state_dict, safe_load
from ..predictor import infer_arch
from ..zoo import ZOO

LATEST = "latest.pth"
LAST_CHECKPOINT = "last_checkpoint"  # mmengine's pointer file: the path of the newest checkpoint
BACKBONE_PREFIX = "backbone.context_path.backbone."


def clean_state_dict(module: nn.Module) -> OrderedDict:
    """CPU copies of the weights under the official names (DDP's `module.` removed)."""
    state = module.state_dict()
    return OrderedDict((k.removeprefix("module."), v.detach().cpu().clone()) for k, v in state.items())


def build_meta(*, classes, palette, arch: str, iteration: int, config_json: str, seed: int, preset: str) -> dict:
    classes = tuple(str(c) for c in classes)
    palette = [[int(v) for v in colour] for colour in palette]
    return {
        "CLASSES": classes,
        "PALETTE": palette,
        "dataset_meta": {"classes": classes, "palette": palette},
        "arch": arch,
        "exp_name": preset,
        "iter": iteration,
        "seed": seed,
        "config": config_json,
        "time": time.asctime(),
        "env_info": f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}",
    }


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _point_latest(work_dir: Path, path: Path) -> None:
    link = work_dir / LATEST
    tmp = work_dir / f".{LATEST}.{os.getpid()}.tmp"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(path.name, tmp)
        os.replace(tmp, link)
    except OSError:  # no symlinks (some filesystems): the pointer file below still names it
        pass
    pointer = work_dir / f".{LAST_CHECKPOINT}.tmp"
    pointer.write_text(str(path.resolve()) + "\n")
    os.replace(pointer, work_dir / LAST_CHECKPOINT)


def save_training_checkpoint(work_dir: Path, iteration: int, checkpoint: dict, max_keep: int = 0) -> Path:
    path = work_dir / f"iter_{iteration}.pth"
    atomic_save(checkpoint, path)
    _point_latest(work_dir, path)
    if max_keep > 0:
        olds = sorted(work_dir.glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
        for old in olds[:-max_keep]:
            old.unlink()
    return path


def find_latest(work_dir: Path) -> Path | None:
    pointer = work_dir / LAST_CHECKPOINT
    if pointer.is_file():
        path = Path(pointer.read_text().strip())
        if path.is_file():
            return path
    if (work_dir / LATEST).exists():
        return (work_dir / LATEST).resolve()
    found = sorted(work_dir.glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    return found[-1] if found else None


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"resume checkpoint {path} does not exist")
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a checkpoint with a state_dict")
    if "optimizer" not in ckpt or "train_state" not in ckpt:
        raise CheckpointError(
            f"{path} holds weights but no training state (optimizer, iteration): it cannot be "
            f"resumed; use --load-from {path} to start a new run from its weights"
        )
    return ckpt


def check_same_model(path, state: dict, model: nn.Module, arch: str, meta: dict | None = None) -> None:
    """Refuse a checkpoint whose network differs from `model` (arch, classes, keys or shapes)."""
    own = {k.removeprefix("module."): v for k, v in model.state_dict().items()}
    theirs_arch = (meta or {}).get("arch") or infer_arch(state)
    problems = []
    if theirs_arch != arch:
        problems.append(f"it was trained as {theirs_arch}, this run builds {arch}")
    if "decode_head.conv_seg.bias" in state and num_classes_of(state) != num_classes_of(own):
        problems.append(f"it has {num_classes_of(state)} classes, this run's dataset has {num_classes_of(own)}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not problems and (missing or unexpected or shapes):
        problems.append(
            f"{len(missing)} missing, {len(unexpected)} unexpected and {len(shapes)} differently shaped "
            f"keys (e.g. {(missing + unexpected + shapes)[:3]})"
        )
    if problems:
        raise CheckpointError(f"cannot resume from {path}: it is a different model: " + "; ".join(problems))


def load_backbone_weights(model: nn.Module, source: str) -> str:
    """ImageNet init of the context-path ResNet from a torchvision-format file (path or URL).

    torchvision names (`conv1`, `bn1`, `layerN.M.*`, `fc.*`) match mmseg's ResNet; `fc.*` is dropped.
    Files of mmcv's deep-stem ResNetV1c (`stem.*`) load their layer1-4 only, as mmseg's non-strict
    PretrainedInit does, leaving the 7x7 stem random. Returns a one-line report.
    """
    state, _ = read_state_dict(source)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    for prefix in (BACKBONE_PREFIX, "backbone.", "context_path.backbone."):
        if any(k.startswith(prefix) for k in state):
            state = OrderedDict((k.removeprefix(prefix), v) for k, v in state.items() if k.startswith(prefix))
            break
    own = model.state_dict()
    targets = {k[len(BACKBONE_PREFIX) :]: k for k in own if k.startswith(BACKBONE_PREFIX)}
    loaded, wrong = {}, []
    for key, value in state.items():
        if key in targets:
            if tuple(value.shape) != tuple(own[targets[key]].shape):
                wrong.append(f"{key}: file {tuple(value.shape)} vs model {tuple(own[targets[key]].shape)}")
            else:
                loaded[targets[key]] = value
    if wrong:
        raise CheckpointError(
            f"backbone weights {source} do not fit this ResNet (another depth?): " + "; ".join(wrong[:5])
        )
    if not loaded:
        raise CheckpointError(
            f"backbone weights {source} hold no ResNet keys (conv1, bn1, layer1-4); "
            "expected a torchvision-format ResNet state_dict"
        )
    weights = [k for k in targets if not k.endswith("num_batches_tracked")]
    skipped = [k for k in weights if targets[k] not in loaded]
    model.load_state_dict(loaded, strict=False)
    report = f"ImageNet backbone from {source}: {len(loaded)} tensors loaded"
    if skipped:
        report += f", {len(skipped)} left at random init (e.g. {skipped[:3]})"
    return report


def load_pretrained(model: nn.Module, source: str) -> str:
    """Start from another model's weights (fine-tuning): every tensor whose name and shape match;
    the classifiers are re-initialised when the class count differs. `source` is a path, a URL or a
    zoo name (an official Cityscapes checkpoint). Returns a one-line report."""
    if source in ZOO:
        source = ZOO[source].url
    state, _ = read_state_dict(source)
    own = model.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    reshaped = [k for k in state if k in own and k not in loaded]
    if not any(k.startswith("backbone.") for k in loaded):
        raise CheckpointError(f"--load-from {source}: no backbone weights match this {infer_arch(own)} model")
    non_head = [k for k in reshaped if "conv_seg" not in k]
    if non_head:
        raise CheckpointError(f"--load-from {source} is a different network: {non_head[:3]} differ in shape")
    model.load_state_dict(loaded, strict=False)
    report = f"weights from {source}: {len(loaded)}/{len(own)} tensors loaded"
    if reshaped:
        report += (
            f"; classifiers {sorted({k.rsplit('.', 1)[0] for k in reshaped})} re-initialised (class count differs)"
        )
    return report
