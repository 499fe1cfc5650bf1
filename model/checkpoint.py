"""Checkpoint download (cached, atomic, hash-checked) and loading into a BiSeNetV1.

Environment:
  BISENET_CACHE_DIR       where downloads are kept (default ~/.cache/bisenet-serve/checkpoints)
  BISENET_WEIGHTS_MIRROR  a base URL or a local folder holding the official file names; replaces
                          download.openmmlab.com for sites without internet.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

log = logging.getLogger("model.checkpoint")

HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(?:pth|pt)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be fetched, read or matched to the network."""


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "bisenet-serve" / "checkpoints"
    return Path(os.environ.get("BISENET_CACHE_DIR") or default)


def mirrored(url: str) -> str:
    """The URL (or local path) to fetch `url` from, honouring BISENET_WEIGHTS_MIRROR."""
    mirror = os.environ.get("BISENET_WEIGHTS_MIRROR")
    if not mirror:
        return url
    return mirror.rstrip("/") + "/" + url.rsplit("/", 1)[-1]


class DownloadProgress:
    """Logs a download's progress at every tenth of its size (every 50 MB when the size is unknown)."""

    UNKNOWN_STEP = 50 << 20

    def __init__(self, filename: str, size: int | None):
        self.filename, self.size, self.done, self.logged = filename, size, 0, 0

    def update(self, n: int) -> None:
        self.done += n
        reached = self.done * 10 // self.size if self.size else self.done // self.UNKNOWN_STEP
        if reached <= self.logged:
            return
        self.logged = reached
        if self.size:
            log.info("downloading %s: %.0f%% of %.0f MB", self.filename, 100 * self.done / self.size, self.size / 2**20)
        else:
            log.info("downloading %s: %.0f MB", self.filename, self.done / 2**20)


def download(url: str, directory: Path | None = None, timeout: float = 60.0) -> Path:
    """Fetch `url` once into the cache and return the local path.

    The file is streamed to a temporary file in the cache directory, its sha256 is checked against
    the prefix embedded in official names (`...-c55e78e2.pth`), and only then renamed into place, so
    a failed or corrupt download never leaves a file that looks complete.
    """
    directory = Path(directory or cache_dir())
    filename = url.rsplit("/", 1)[-1]
    target = directory / filename
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    source = mirrored(url)
    expected = HASH_IN_NAME.search(filename)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out, _open_source(source, timeout) as (src, size):
            log.info(
                "downloading %s (%s) from %s", filename, f"{size / 2**20:.0f} MB" if size else "size unknown", source
            )
            progress = DownloadProgress(filename, size)
            with tqdm(total=size, desc=filename, unit="B", unit_scale=True, disable=not sys.stderr.isatty()) as bar:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
                    if bar.disable:  # no terminal (a container, a log collector): progress as log lines
                        progress.update(len(chunk))
        if expected and not digest.hexdigest().startswith(expected.group(1)):
            raise CheckpointError(
                f"{filename}: sha256 {digest.hexdigest()[:16]}... does not match the expected prefix "
                f"{expected.group(1)} (downloaded from {source}); the file was discarded"
            )
        os.replace(tmp, target)
        log.info("saved %s", target)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise CheckpointError(
            f"could not download {filename} from {source}: {exc}. Set BISENET_WEIGHTS_MIRROR to a URL or "
            f"folder that holds {filename}, or pass a local file path as the weights"
        ) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@contextlib.contextmanager
def _open_source(source: str, timeout: float):
    """(readable file, size in bytes or None) for an http(s) URL or a local path."""
    if "://" in source:
        with urllib.request.urlopen(source, timeout=timeout) as resp:  # noqa: S310 - http(s) only
            length = resp.headers.get("Content-Length")
            yield resp, int(length) if length and length.isdigit() else None
    else:
        with open(source, "rb") as src:
            yield src, os.fstat(src.fileno()).st_size


def safe_load(path: Path) -> dict:
    """Read a checkpoint with `torch.load(weights_only=True)`.

    weights_only unpickling only rebuilds tensors and plain containers (dict, list, tuple, str,
    numbers); it never imports or calls arbitrary code. mmsegmentation's files also hold numpy
    scalars/arrays in their `meta`, so the few numpy reconstructors those need are allow-listed
    and nothing else is.
    """
    import numpy as np

    # numpy 2 renamed (and deprecated) np.core; numpy 1.26 has a np._core stub without multiarray.
    core = np._core if int(np.__version__.split(".")[0]) >= 2 else np.core
    allowed = [np.dtype, np.ndarray, core.multiarray.scalar, core.multiarray._reconstruct]  # type: ignore[attr-defined]
    allowed += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "uint8", "bool")]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear error
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def read_state_dict(source: str | os.PathLike) -> tuple["OrderedDict[str, torch.Tensor]", dict]:
    """Return (state_dict, meta) from a path or URL; accepts mmseg containers and bare state_dicts."""
    source = str(source)
    path = download(source) if source.startswith(("http://", "https://")) else Path(source)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    obj = safe_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} has no state_dict of tensors")
    cleaned = OrderedDict((k[len("module.") :] if k.startswith("module.") else k, v) for k, v in state.items())
    return cleaned, meta


def load_checkpoint(net: nn.Module, source: str | os.PathLike, strict_aux: bool = False) -> dict:
    """Load a path or http(s) URL into `net`; returns the checkpoint's `meta`.

    Accepts mmsegmentation checkpoints (`{'meta', 'state_dict', ...}`) and bare state_dicts, strips
    `module.` prefixes, and ignores `auxiliary_head.*` when the network has none (or, unless
    `strict_aux`, when the checkpoint lacks them). Any other missing, unexpected or wrongly shaped
    key raises CheckpointError listing them all.
    """
    state, meta = read_state_dict(source)
    load_state(net, state, source, strict_aux)
    return meta


def load_state(net: nn.Module, state: dict, source: str | os.PathLike = "state_dict", strict_aux: bool = False) -> None:
    """Load an already read (cleaned) state_dict with the checks of `load_checkpoint`."""
    own = net.state_dict()
    if not any(k.startswith("auxiliary_head.") for k in own):
        state = OrderedDict((k, v) for k, v in state.items() if not k.startswith("auxiliary_head."))
    missing = [k for k in own if k not in state]
    if not strict_aux:
        missing = [k for k in missing if not k.startswith("auxiliary_head.")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(_mismatch_message(source, missing, unexpected, shapes))
    net.load_state_dict(state, strict=False)


def _mismatch_message(source, missing, unexpected, shapes) -> str:
    def block(title, items):
        shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
        return f"\n  {title} ({len(items)}):\n    {shown}" if items else ""

    hint = ""
    if any(k.startswith("decode_head.conv_seg.weight:") for k in shapes):
        hint = "\n  (the class count differs: build the model with num_classes matching the checkpoint)"
    return (
        f"checkpoint {source} does not match the network:"
        + block("missing keys", missing)
        + block("unexpected keys", unexpected)
        + block("wrong shapes", shapes)
        + hint
    )


def num_classes_of(state: dict) -> int:
    """The class count of a BiSeNetV1 state_dict (from decode_head.conv_seg.bias)."""
    if "decode_head.conv_seg.bias" not in state:
        raise CheckpointError("the checkpoint has no decode_head.conv_seg: not a BiSeNetV1 segmentation model")
    return int(state["decode_head.conv_seg.bias"].shape[0])
