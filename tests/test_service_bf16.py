"""`--dtype bfloat16` on a CPU with native bf16: the real service serves every TTA mode under the
autocast, with the labels of the in-process engine in the same dtype, and reports its dtype."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from model import Segmenter
from model.devices import cpu_has_native_bf16
from tests.servicekit import FAST_ARGS, Service

pytestmark = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")


@pytest.fixture(scope="module")
def service(varied_r18_checkpoint):
    svc = Service([*FAST_ARGS, "--model", f"bisenetv1_r18={varied_r18_checkpoint}", "--dtype", "bfloat16"])
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


@pytest.mark.parametrize("tta", ["none", "flip", "ms_flip"])
def test_bf16_service_labels_equal_the_bf16_engine(service, varied_r18_checkpoint, photo, tta):
    image = np.ascontiguousarray(photo[100:260, 60:300])
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    r = httpx.post(
        f"{service.url}/segment",
        content=png.getvalue(),
        params={"tta": tta, "format": "raw"},
        headers={"Content-Type": "image/png"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    served = np.frombuffer(r.content, np.uint8).reshape(160, 240)
    reference = Segmenter("bisenetv1_r18", weights=varied_r18_checkpoint, dtype="bfloat16", scale=(256, 128))
    assert (served == reference.predict(image, tta=tta)).mean() >= 0.999
    assert len(np.unique(served)) > 1


def test_models_report_bfloat16(service):
    models = httpx.get(f"{service.url}/models", timeout=30).json()
    assert "bfloat16" in str(models), models
