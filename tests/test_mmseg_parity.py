"""Parity with a real mmsegmentation 1.x, when one is installed beside the project (`make parity`
builds such a venv; the default test venv has none, so these skip).

The checks live in tools/parity_mmseg.py; this runs them with pytest's reporting.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("mmseg")
pytest.importorskip("mmengine")
cv2 = pytest.importorskip("cv2")

from model import Segmenter, build_model, load_checkpoint  # noqa: E402
from model.transforms import resize_uint8  # noqa: E402
from tests.conftest import load_parity_tool  # noqa: E402


@pytest.fixture(scope="module")
def parity():
    return load_parity_tool()


@pytest.fixture(scope="module")
def images(parity):
    return parity.photos()


@pytest.fixture(scope="module", params=["r18", "r50"])
def models(request, parity, tmp_path_factory):
    arch = request.param
    ckpt = parity.make_checkpoint(arch, tmp_path_factory.mktemp("mmseg") / f"{arch}.pth")
    net = build_model(f"bisenetv1_{arch}").eval()
    load_checkpoint(net, ckpt)
    segmenter = Segmenter(f"bisenetv1_{arch}", weights=str(ckpt))
    return arch, parity.load_mmseg(arch, ckpt), net, segmenter


def test_resize_is_bit_exact_with_opencv():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w, new_h, new_w = (int(v) for v in rng.integers(1, 700, 4))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = resize_uint8(torch.from_numpy(image)[None], (new_h, new_w))[0].numpy()
        assert np.array_equal(ours, cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR))


def test_decode_logits(parity, models, images):
    arch, mm_model, net, segmenter = models
    for image in (images["coffee"], images["chelsea"][:95, :27]):
        row = parity.logits_error(arch, mm_model, net, segmenter.engine, image)
        assert row["rel_err"] <= parity.THRESHOLDS["logits_rel"], row
        assert row["folded_rel_err"] <= parity.THRESHOLDS["logits_rel"], row


def test_labels_of_inference_model(parity, models, images):
    _, mm_model, _, segmenter = models
    for row in parity.label_agreement(mm_model, segmenter, images):
        frame = row["image"].startswith("frame")
        need = parity.THRESHOLDS["frame_agree" if frame else "photo_agree"]
        assert row["agreement"] >= need, row
        assert row["classes_present"] >= 3, row  # varied labels: the comparison means something
