"""Checkpoint reading, loading and downloading, including every bad input of issue 2.

Downloads go to a real http.server on 127.0.0.1 (a free port) serving files the tests make, with
official-style names that carry the sha256 prefix.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pathlib
import shutil
import sys
import threading
from collections import OrderedDict

import pytest
import torch

from model import CheckpointError, Segmenter, build_model, load_checkpoint
from model.checkpoint import HASH_IN_NAME, download, read_state_dict
from model.zoo import DEFAULT_WEIGHTS, ZOO, default_entry

# -- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r18_state():
    torch.manual_seed(0)
    return build_model("bisenetv1_r18").state_dict()


def same_weights(net: torch.nn.Module, state: dict) -> bool:
    """Every tensor the two share is equal (a net without aux heads shares all but those)."""
    own = net.state_dict()
    shared = [k for k in own if k in state]
    return len(shared) >= 200 and all(torch.equal(own[k], state[k]) for k in shared)


def save(obj, path: pathlib.Path) -> str:
    torch.save(obj, path)
    return str(path)


def shaped_like(name: str, **kwargs) -> OrderedDict:
    """A state_dict with another model's real keys and shapes, built on the meta device and
    stored as expanded scalars (a few bytes on disk, however large the model)."""
    with torch.device("meta"):
        meta_state = build_model(name, **kwargs).state_dict()
    return OrderedDict((k, torch.zeros((), dtype=v.dtype).expand(v.shape)) for k, v in meta_state.items())


# -- formats -------------------------------------------------------------------------------


def test_mmseg_container(r18_checkpoint):
    torch.manual_seed(1)
    net = build_model("bisenetv1_r18")
    meta = load_checkpoint(net, r18_checkpoint)
    assert meta["CLASSES"] == ("a",) * 19
    state, _ = read_state_dict(r18_checkpoint)
    assert len(state) == 222 and same_weights(net, state)


def test_bare_state_dict_and_module_prefix(tmp_path, r18_state):
    bare = save(r18_state, tmp_path / "bare.pth")
    prefixed = save(OrderedDict(("module." + k, v) for k, v in r18_state.items()), tmp_path / "ddp.pth")
    for path in (bare, prefixed):
        net = build_model("bisenetv1_r18")
        assert load_checkpoint(net, path) == {}
        assert same_weights(net, r18_state)


def test_aux_heads_are_optional(tmp_path, r18_state):
    no_aux = OrderedDict((k, v) for k, v in r18_state.items() if not k.startswith("auxiliary_head."))
    path = save({"meta": {}, "state_dict": no_aux}, tmp_path / "no_aux.pth")
    net = build_model("bisenetv1_r18", aux_heads=False)
    load_checkpoint(net, path)
    assert same_weights(net, no_aux)
    load_checkpoint(build_model("bisenetv1_r18"), path)  # a training net may start without aux weights
    with pytest.raises(CheckpointError, match="auxiliary_head.0.conv_seg.weight"):
        load_checkpoint(build_model("bisenetv1_r18"), path, strict_aux=True)
    # A full (training) checkpoint loads into an inference net without aux heads.
    full = save({"state_dict": r18_state}, tmp_path / "full.pth")
    net = build_model("bisenetv1_r18", aux_heads=False)
    load_checkpoint(net, full)
    assert same_weights(net, r18_state)


# -- bad files -----------------------------------------------------------------------------


def test_truncated_and_corrupt_files(tmp_path, r18_checkpoint):
    data = pathlib.Path(r18_checkpoint).read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for path in (truncated, garbage, empty):
        with pytest.raises(CheckpointError, match=f"cannot read checkpoint {path}"):
            load_checkpoint(build_model("bisenetv1_r18", aux_heads=False), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(build_model("bisenetv1_r18"), tmp_path / "nope.pth")


def test_files_without_a_state_dict(tmp_path):
    for obj, match in (([torch.zeros(1)], "holds a list"), ({"state_dict": {"a": "b"}}, "no state_dict of tensors")):
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(build_model("bisenetv1_r18"), save(obj, tmp_path / "odd.pth"))


def test_r50_checkpoint_into_r18_lists_keys(tmp_path):
    path = save({"meta": {}, "state_dict": shaped_like("bisenetv1_r50")}, tmp_path / "r50.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(build_model("bisenetv1_r18"), path)
    message = str(info.value)
    assert "does not match the network" in message
    # Bottleneck keys R18 lacks, and a shape that differs, are named.
    assert "unexpected keys" in message and "layer1.0.conv3.weight" in message
    assert "wrong shapes" in message
    assert "layer1.0.conv1.weight: checkpoint (64, 64, 1, 1) vs model (64, 64, 3, 3)" in message
    assert "... and " in message  # long lists are cut, with a count


def test_class_count_refused_unless_asked(tmp_path):
    torch.manual_seed(0)
    state = build_model("bisenetv1_r18", num_classes=8, aux_heads=False).state_dict()
    path = save({"meta": {"CLASSES": [f"c{i}" for i in range(8)]}, "state_dict": state}, tmp_path / "c8.pth")
    with pytest.raises(CheckpointError, match="num_classes") as info:
        load_checkpoint(build_model("bisenetv1_r18"), path)
    assert "decode_head.conv_seg.weight: checkpoint (8, 256, 1, 1) vs model (19, 256, 1, 1)" in str(info.value)
    net = build_model("bisenetv1_r18", num_classes=8)
    load_checkpoint(net, path)
    assert same_weights(net, state)
    # Segmenter takes the class count from the checkpoint, and refuses a contradicting one.
    seg = Segmenter("bisenetv1_r18", weights=path)
    assert seg.num_classes == 8 and seg.classes[0] == "c0" and len(seg.palette) == 8
    with pytest.raises(CheckpointError, match="num_classes"):
        Segmenter("bisenetv1_r18", weights=path, num_classes=19)


class _Payload:
    """Unpickling this calls pathlib.Path.touch: code execution, in miniature."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_that_runs_code_is_refused(tmp_path, r18_state):
    marker = tmp_path / "pwned"
    path = save({"meta": {"evil": _Payload(marker)}, "state_dict": r18_state}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(build_model("bisenetv1_r18"), path)
    assert not marker.exists()


# -- the zoo -------------------------------------------------------------------------------


def test_zoo_table():
    assert len(ZOO) == 5
    assert {e.miou for e in ZOO.values()} == {74.44, 74.37, 75.16, 76.92, 77.68}
    assert default_entry("bisenetv1_r18").miou == 75.16 and default_entry("bisenetv1_r50").miou == 77.68
    assert set(DEFAULT_WEIGHTS) == {"bisenetv1_r18", "bisenetv1_r50"}
    for entry in ZOO.values():
        assert entry.url.startswith("https://download.openmmlab.com/mmsegmentation/v0.5/bisenetv1/")
        assert HASH_IN_NAME.search(entry.filename), entry.filename
    assert ZOO["bisenetv1_r18_4x4_scratch"].filename.endswith("-c55e78e2.pth")


# -- downloads -----------------------------------------------------------------------------


class _Server:
    def __init__(self, root: pathlib.Path):
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):  # noqa: N802 - http.server's name
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free one
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    srv = _Server(root)
    yield srv
    srv.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("BISENET_CACHE_DIR", str(path))
    monkeypatch.delenv("BISENET_WEIGHTS_MIRROR", raising=False)
    return path


def publish(r18_checkpoint: str, folder: pathlib.Path, digest: str | None = None) -> str:
    """Copy the checkpoint into `folder` under an official-style name with its sha256 prefix."""
    data = pathlib.Path(r18_checkpoint).read_bytes()
    digest = digest or hashlib.sha256(data).hexdigest()[:8]
    name = f"bisenetv1_r18-d32_test_20240101_000000-{digest}.pth"
    (folder / name).write_bytes(data)
    return name


def test_download_once_then_cached(server, cache, r18_checkpoint):
    name = publish(r18_checkpoint, server.root)
    url = f"{server.url}/{name}"
    for _ in range(2):
        net = build_model("bisenetv1_r18")
        load_checkpoint(net, url)
    assert server.requests == [f"/{name}"]
    assert [p.name for p in cache.iterdir()] == [name]
    assert (cache / name).read_bytes() == pathlib.Path(r18_checkpoint).read_bytes()
    state, _ = read_state_dict(r18_checkpoint)
    assert same_weights(net, state)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_download_logs_and_shows_progress_on_a_terminal(server, cache, r18_checkpoint, monkeypatch, caplog):
    name = publish(r18_checkpoint, server.root)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with caplog.at_level("INFO", logger="model.checkpoint"):
        download(f"{server.url}/{name}")
    size_mb = pathlib.Path(r18_checkpoint).stat().st_size / 2**20
    assert f"downloading {name} ({size_mb:.0f} MB) from {server.url}/{name}" in caplog.text
    assert f"saved {cache / name}" in caplog.text
    bar = terminal.getvalue()
    assert name in bar and "100%" in bar  # tqdm's bar, sized from Content-Length


def test_hash_mismatch_leaves_nothing(server, cache, r18_checkpoint):
    name = publish(r18_checkpoint, server.root, digest="deadbeef")
    with pytest.raises(CheckpointError, match="sha256 .* does not match the expected prefix deadbeef"):
        download(f"{server.url}/{name}")
    assert not cache.exists() or list(cache.iterdir()) == []


def test_failed_download_names_file_source_and_mirror(server, cache):
    name = "bisenetv1_r18-d32_missing_20240101_000000-0123abcd.pth"
    for url in (f"{server.url}/{name}", f"http://127.0.0.1:{_closed_port()}/{name}"):
        with pytest.raises(CheckpointError) as info:
            download(url, timeout=5)
        message = str(info.value)
        assert name in message and url in message and "BISENET_WEIGHTS_MIRROR" in message
        assert not cache.exists() or list(cache.iterdir()) == []


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mirror_url_and_folder(server, cache, tmp_path, monkeypatch, r18_checkpoint):
    mirror_dir = server.root / "mirror"
    mirror_dir.mkdir()
    name = publish(r18_checkpoint, mirror_dir)
    # Stands for the official host; on a closed loopback port, so a broken mirror can reach nothing.
    official = f"http://127.0.0.1:{_closed_port()}/mmsegmentation/v0.5/bisenetv1/some_config/{name}"
    monkeypatch.setenv("BISENET_WEIGHTS_MIRROR", f"{server.url}/mirror/")
    path = download(official)
    assert path == cache / name and server.requests == [f"/mirror/{name}"]

    # A folder as the mirror, into a fresh cache.
    shutil.rmtree(cache)
    monkeypatch.setenv("BISENET_WEIGHTS_MIRROR", str(mirror_dir))
    net = build_model("bisenetv1_r18")
    load_checkpoint(net, official)
    assert (cache / name).exists() and len(server.requests) == 1
