"""A checkpoint of one's own (other classes, palette, name) is served with its classes and palette."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model import Segmenter, build_model
from tests.conftest import randomise_bn
from tests.servicekit import FAST_ARGS, Service

CLASSES = ("background", "crop", "weed", "soil", "stone")
PALETTE = ((0, 0, 0), (0, 200, 0), (200, 0, 200), (120, 80, 40), (128, 128, 128))


@pytest.fixture(scope="module")
def custom_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(3)
    net = build_model("bisenetv1_r50", num_classes=len(CLASSES))
    randomise_bn(net)
    path = tmp_path_factory.mktemp("custom") / "fields.pth"
    torch.save(
        {"meta": {"CLASSES": CLASSES, "PALETTE": [list(c) for c in PALETTE]}, "state_dict": net.state_dict()}, path
    )
    return str(path)


def test_custom_named_checkpoint_is_served_with_its_classes(custom_checkpoint, photo):
    svc = Service([*FAST_ARGS, "--model", f"fields-v2={custom_checkpoint}"])
    try:
        svc.wait_ready()
        info = httpx.get(f"{svc.url}/models").json()["models"][0]
        assert (info["name"], info["arch"], info["classes"]) == ("fields-v2", "bisenetv1_r50", list(CLASSES))
        assert info["palette"] == [list(c) for c in PALETTE] and info["published_miou"] is None
        image = np.asarray(Image.fromarray(photo).resize((80, 60)))
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        r = httpx.post(f"{svc.url}/segment", content=buf.getvalue(), headers={"Content-Type": "image/png"}, timeout=120)
        assert r.status_code == 200 and r.headers["x-model"] == "fields-v2"
        png = Image.open(io.BytesIO(r.content))
        assert png.getpalette()[:15] == [v for c in PALETTE for v in c]
        expected = Segmenter("fields-v2", weights=custom_checkpoint, scale=(256, 128)).predict(image)
        np.testing.assert_array_equal(np.asarray(png), expected)
        assert expected.max() < len(CLASSES)
    finally:
        svc.stop()


def test_custom_name_needs_a_checkpoint():
    from service.config import ConfigError, parse_models

    with pytest.raises(ConfigError, match="NAME=CHECKPOINT"):
        parse_models(["fields-v2=random"])
    with pytest.raises(ConfigError, match="bad model name"):
        parse_models(["bad name=/x.pth"])
    assert parse_models(["mine=/x.pth,fast"])[1].name == "bisenetv1_r18"
