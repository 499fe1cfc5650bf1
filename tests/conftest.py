"""Shared fixtures: small real photos, random-weight checkpoints on disk, CUDA detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import build_model

HAS_CUDA = torch.cuda.is_available()
# The `gpu` mark: `pytest -m gpu` selects these tests (tools/gpu_check.sh does), and without CUDA
# they skip (pytest_collection_modifyitems below).
gpu = pytest.mark.gpu


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    needs_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(needs_cuda)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real RGB photo (scikit-image's astronaut, 512x512)."""
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def r18_checkpoint(tmp_path_factory) -> str:
    """An mmsegmentation-layout R18 checkpoint with random (seeded) weights and non-trivial BN stats."""
    torch.manual_seed(0)
    net = build_model("bisenetv1_r18")
    randomise_bn(net)
    path = tmp_path_factory.mktemp("ckpt") / "r18.pth"
    torch.save({"meta": {"CLASSES": ("a",) * 19}, "state_dict": net.state_dict()}, path)
    return str(path)


def randomise_bn(net: torch.nn.Module) -> None:
    """Give BN layers non-identity statistics so folding and loading are really exercised."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def calibrate_bn(net: torch.nn.Module, images: torch.Tensor) -> None:
    """BN running statistics measured on `images` (N>1, normalised NCHW), as training leaves them,
    plus a wide classifier: the random network then gives varied, image-dependent labels rather
    than one class everywhere, so label comparisons mean something."""
    g = torch.Generator().manual_seed(2)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    net.train()
    with torch.no_grad():
        net(images)
    for m in bns:
        m.momentum = 0.1
    conv_seg = net.decode_head.conv_seg
    conv_seg.weight.data.normal_(0, 0.5, generator=g)
    conv_seg.bias.data.normal_(0, 0.5, generator=g)
    net.eval()


@pytest.fixture(scope="session")
def varied_r18_checkpoint(tmp_path_factory, photo) -> str:
    """An R18 checkpoint (no aux heads) whose labels vary across a photo; see calibrate_bn."""
    from model.transforms import normalise

    torch.manual_seed(0)
    net = build_model("bisenetv1_r18", aux_heads=False)
    batch = torch.from_numpy(np.stack([photo, photo[::-1].copy(), photo[:, ::-1].copy()]))
    calibrate_bn(net, normalise(batch, (128, 128)))
    path = tmp_path_factory.mktemp("ckpt") / "r18_varied.pth"
    torch.save({"meta": {}, "state_dict": net.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def varied_r18_net(varied_r18_checkpoint):
    """The varied R18 checkpoint loaded into a plain eval-mode network (no auxiliary heads)."""
    from model import load_checkpoint

    net = build_model("bisenetv1_r18", aux_heads=False).eval()
    load_checkpoint(net, varied_r18_checkpoint)
    return net


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: on a small shared CPU, two spinning OpenMP threads competing with other
    processes make tiny steps tens of times slower; results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def require_mmseg(module: str):
    """Import `module` (mmseg, mmengine); skip without it, or fail when BISENET_REQUIRE_MMSEG is set
    (`make test` runs the parity files in .venv-parity, where a missing mmseg is a failure)."""
    import importlib
    import os

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("BISENET_REQUIRE_MMSEG", "") not in ("", "0"):
            pytest.fail(f"BISENET_REQUIRE_MMSEG is set but {module} cannot be imported: {exc}", pytrace=False)
        pytest.skip(f"{module} is not installed (`make test-parity` runs this in .venv-parity)")


def load_parity_tool():
    """tools/parity_mmseg.py as a module, with mmcv.ops stubbed (needs mmsegmentation importable)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "parity_mmseg.py"
    spec = importlib.util.spec_from_file_location("parity_mmseg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.stub_mmcv_ops()
    return module


@pytest.fixture(scope="module")
def receiver():
    """An OTLP/HTTP trace receiver on 127.0.0.1 for the module's traced services."""
    from service.bench.trace_sink import TraceSink

    receiver = TraceSink()
    yield receiver
    receiver.close()
