"""Parity with a real mmsegmentation 1.x: `make test` runs this file in .venv-parity/ (mmseg 1.2.2,
built by the Makefile) with BISENET_REQUIRE_MMSEG=1, where a missing mmseg is a failure; in a venv
without mmseg the mmseg checks skip. The OpenCV check of the test-time resize runs everywhere.

The checks live in tools/parity_mmseg.py (its THRESHOLDS say what was measured); this runs them
with pytest's reporting:
- decode logits on the same input: our network as built equals mmseg's bit for bit, the BN-folded
  engine that Segmenter runs within a small measured relative error;
- labels of `Segmenter.predict` against `mmseg.apis.inference_model` on a 2048x1024 frame and on
  photos that both sides resize, per architecture.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import Segmenter, build_model, load_checkpoint
from model.transforms import resize_uint8


@pytest.fixture(scope="module")
def parity():
    from conftest import load_parity_tool, require_mmseg  # not tests.conftest: mmseg installs a `tests` package

    require_mmseg("mmseg")
    require_mmseg("mmengine")

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
    """mmseg's test pipeline resizes with cv2.resize(INTER_LINEAR) on uint8 (mmcv.imrescale);
    model.transforms.resize_uint8 reproduces its fixed-point arithmetic."""
    cv2 = pytest.importorskip("cv2")
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
        assert row["max_abs_diff"] == 0, row  # our network as built: bit-identical to mmseg's
        assert parity.logits_ok(row), row  # and the BN-folded engine within its measured tolerance


def test_labels_of_inference_model(parity, models, images):
    _, mm_model, _, segmenter = models
    rows = parity.label_agreement(mm_model, segmenter, images)
    assert any(row["image"] == "frame_2048x1024" for row in rows)
    for row in rows:
        assert row["agreement"] >= parity.agreement_needed(row["image"]) >= 0.9999, row
        assert row["classes_present"] >= 3, row  # varied labels: the comparison means something
