"""`bisenet`: one command, a --help on every subcommand, and `segment`/`models` in this process."""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from model import Segmenter
from service.api.imaging import decode_image
from service.cli import BENCHES, COMMANDS
from service.cli import main as bisenet
from tests.servicekit import BISENET, FAST_ARGS, Service


def test_help_lists_every_subcommand():
    run = subprocess.run([BISENET, "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for name in ("serve", "segment", "stream", "models", "train", "evaluate", "prepare-cityscapes", "export", "bench"):
        assert f"\n  {name} " in run.stdout, name


@pytest.mark.parametrize("argv", [[name] for name in COMMANDS if name != "bench"] + [["bench", b] for b in BENCHES])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        bisenet([*argv, "--help"])
    assert exit_.value.code == 0
    assert f"usage: bisenet {' '.join(argv)}" in capsys.readouterr().out


def test_unknown_subcommand_is_refused(capsys):
    assert bisenet(["segmnet"]) == 2
    assert "unknown command 'segmnet'" in capsys.readouterr().err
    assert bisenet(["bench", "nope"]) == 2


def test_version(capsys):
    assert bisenet(["--version"]) == 0
    assert capsys.readouterr().out.startswith("bisenet-serve ")


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_segment_in_process_equals_the_segmenter(varied_r18_checkpoint, photo, tmp_path, capsys):
    """One image: label PNG and overlay at the given paths; labels are Segmenter.predict's on the
    service's decode of the same bytes."""
    small = np.asarray(Image.fromarray(photo).resize((128, 96)))
    image = tmp_path / "street.jpg"
    image.write_bytes(_jpeg(small))
    out, overlay = tmp_path / "labels.png", tmp_path / "overlay.jpg"
    model = f"mine={varied_r18_checkpoint}"
    assert bisenet(["segment", str(image), "--model", model, "-o", str(out), "--overlay", str(overlay)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}: mine 128x96 ")
    expected = Segmenter("mine", weights=varied_r18_checkpoint).predict(decode_image(image.read_bytes(), 1 << 24))
    with Image.open(out) as labels_png:
        assert labels_png.mode == "P"
        np.testing.assert_array_equal(np.asarray(labels_png), expected)
    assert len(np.unique(expected)) > 1  # the labels vary, so the comparison means something
    with Image.open(overlay) as ov:
        assert ov.format == "JPEG" and ov.size == (128, 96)


def test_segment_many_images_into_folders_with_json(varied_r18_checkpoint, photo, tmp_path, capsys):
    paths = []
    for i, size in enumerate([(64, 48), (80, 40)]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(photo).resize(size).save(path)
        paths.append(str(path))
    out = tmp_path / "labels"
    argv = ["segment", *paths, "--model", f"mine={varied_r18_checkpoint}", "-o", str(out), "--json"]
    assert bisenet(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(r["image"], r["width"], r["height"]) for r in records] == [(paths[0], 64, 48), (paths[1], 80, 40)]
    for record in records:
        assert sum(c["pixels"] for c in record["classes"]) == record["width"] * record["height"]
        assert {"id", "name", "pixels", "fraction"} <= set(record["classes"][0])
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img1.png"]


def test_segment_bad_input(tmp_path, varied_r18_checkpoint, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert bisenet(["segment", str(broken), "--model", f"mine={varied_r18_checkpoint}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bisenet segment: error:") and "BytesIO" not in err
    assert bisenet(["segment", str(tmp_path / "missing.jpg"), "--model", f"mine={varied_r18_checkpoint}"]) == 1
    assert bisenet(["segment", str(broken), "--model", "resnet101"]) == 1
    assert "unknown model 'resnet101'" in capsys.readouterr().err


def test_models_lists_the_zoo(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BISENET_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BISENET_URL", raising=False)
    assert bisenet(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    r18 = next(line for line in lines if line.startswith("bisenetv1_r18_4x8_in1k "))
    assert "75.16" in r18 and "77.24" in r18 and "bisenetv1_r18 (fast)" in r18 and r18.endswith(" no")


@pytest.fixture(scope="module")
def service(varied_r18_checkpoint):
    svc = Service([*FAST_ARGS, "--grpc-port", "0", "--model", f"mine={varied_r18_checkpoint}", "--api-key", "k"])
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


def test_segment_through_a_service_equals_in_process(service, varied_r18_checkpoint, photo, tmp_path, capsys):
    """`--url` sends the bytes to the service; the same command in this process, at the service's
    resize scale, writes the same label PNG (and both print the same class statistics)."""
    image = tmp_path / "photo.jpg"
    image.write_bytes(_jpeg(np.asarray(Image.fromarray(photo).resize((120, 90)))))
    remote, local = tmp_path / "remote.png", tmp_path / "local.png"
    assert bisenet(["segment", str(image), "--url", service.url, "--api-key", "k", "-o", str(remote), "--json"]) == 0
    remote_stats = json.loads(capsys.readouterr().out)
    argv = ["segment", str(image), "--model", f"mine={varied_r18_checkpoint}", "--resize-scale", "256x128"]
    assert bisenet([*argv, "-o", str(local), "--json"]) == 0
    local_stats = json.loads(capsys.readouterr().out)
    assert remote.read_bytes() == local.read_bytes()
    assert remote_stats == local_stats and remote_stats["model"] == "mine"
    assert bisenet(["segment", str(image), "--url", service.url, "--api-key", "wrong"]) == 1
    assert "401 unauthorized" in capsys.readouterr().err


def test_models_of_a_service(service, capsys):
    assert bisenet(["models", "--url", service.url, "--api-key", "k"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["default"] == "mine" and [m["name"] for m in listing["models"]] == ["mine"]
    assert bisenet(["models", "--url", "http://127.0.0.1:9"]) == 1  # nothing listens on the discard port
    assert "bisenet models: error:" in capsys.readouterr().err
