"""Segmenter and SegmentationEngine: image validation, batching, BN folding, and (on a GPU) the
CUDA-graph path. CPU tests use a small test-time scale so the network runs on ~128-pixel images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gpu
from PIL import Image

from model import Segmenter, transforms
from model.graph_policy import CaptureLimits
from model.runtime import SegmentationEngine, fold_batchnorm, resolve_dtype
from model.transforms import as_rgb_uint8, logits_to_labels, normalise

SMALL = (256, 128)  # test-time scale: long edge <= 256, short edge <= 128


@pytest.fixture(scope="module")
def net(varied_r18_net):
    return varied_r18_net


@pytest.fixture(scope="module")
def segmenter(varied_r18_checkpoint):
    return Segmenter("bisenetv1_r18", weights=varied_r18_checkpoint, scale=SMALL)


@pytest.fixture(scope="module")
def crops(photo):
    """Real image content at small, partly odd sizes."""
    return [photo[:64, :128], photo[100:148, 50:130], photo[200:264, 300:428], photo[7:102, 11:38]]


def reference_labels(net: torch.nn.Module, image: np.ndarray, scale=SMALL) -> np.ndarray:
    """The mmseg test pipeline spelled out on the unfolded network: resize, normalise, net, resize x2, argmax."""
    height, width = image.shape[:2]
    size = transforms.test_size(height, width, scale)
    with torch.inference_mode():
        logits = net(normalise(torch.from_numpy(np.ascontiguousarray(image))[None], size))
        return logits_to_labels(logits, size, (height, width))[0].numpy()


# -- image validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image,match",
    [
        (np.zeros((8, 8, 3), np.float32), "dtype uint8"),
        (np.zeros((8, 8, 3), np.uint16), "dtype uint8"),
        (np.zeros((8, 8, 2), np.uint8), "HxWx3"),
        (np.zeros((8, 8, 5), np.uint8), "HxWx3"),
        (np.zeros((2, 8, 8, 3), np.uint8), "HxWx3"),
        (np.zeros((0, 8, 3), np.uint8), "zero size"),
        (np.zeros((8, 0), np.uint8), "zero size"),
        ([[1, 2], [3, 4]], "numpy array or a PIL image"),
    ],
)
def test_bad_images_refused(segmenter, image, match):
    with pytest.raises(ValueError, match=match):
        segmenter.predict(image)


def test_grayscale_rgba_and_pil_converted(segmenter, photo):
    rgb = np.ascontiguousarray(photo[:64, :96])
    gray = rgb[:, :, 1]
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    expected_gray = segmenter.predict(np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(segmenter.predict(gray), expected_gray)
    assert np.array_equal(segmenter.predict(gray[:, :, None]), expected_gray)
    assert np.array_equal(segmenter.predict(Image.fromarray(gray, "L")), expected_gray)
    expected = segmenter.predict(rgb)
    assert np.array_equal(segmenter.predict(rgba), expected)
    assert np.array_equal(segmenter.predict(Image.fromarray(rgb)), expected)
    assert np.array_equal(segmenter.predict(Image.fromarray(rgba, "RGBA")), expected)
    assert np.array_equal(segmenter.predict(rgb[:, ::-1][:, ::-1]), expected)  # non-contiguous views too
    assert as_rgb_uint8(Image.fromarray(rgb).convert("P")).shape == rgb.shape  # palette images


def test_predict_shape_dtype_and_varied_labels(segmenter, photo):
    labels = segmenter.predict(photo)
    assert labels.shape == photo.shape[:2] and labels.dtype == np.uint8
    assert labels.max() < 19
    counts = np.bincount(labels.ravel(), minlength=19)
    assert (counts > 0).sum() >= 3 and counts.max() < 0.9 * labels.size  # the comparisons below mean something


# -- consistency -------------------------------------------------------------------------------


def test_predict_batch_matches_predict(segmenter, crops):
    images = [crops[0], crops[1], crops[0][:, ::-1], crops[3], crops[2]]  # mixed sizes, repeated shapes
    batched = segmenter.predict_batch(images)
    assert len(batched) == len(images)
    for image, labels in zip(images, batched):
        single = segmenter.predict(image)
        assert labels.shape == image.shape[:2]
        assert (labels == single).mean() >= 0.999


def test_segmenter_equals_mmseg_pipeline_on_unfolded_net(segmenter, net, crops, photo):
    """Segmenter (BN folded) against the test pipeline written out on the plain network."""
    for image in [*crops, photo]:
        ours = segmenter.predict(image)
        assert (ours == reference_labels(net, image)).mean() >= 0.999


def test_bn_folding_keeps_logits(net, photo):
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # the original is untouched
    x = normalise(torch.from_numpy(photo)[None], (128, 128))
    with torch.inference_mode():
        ref, out = net(x), folded(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.999


def test_engine_options_agree_on_cpu(net, photo):
    images = np.stack([photo[:96, :160], photo[200:296, 100:260]])
    base = SegmentationEngine(net, "cpu", fold_bn=False, scale=SMALL).segment(images)
    for options in ({"fold_bn": True}, {"channels_last": True}, {"cuda_graphs": True}):
        engine = SegmentationEngine(net, "cpu", scale=SMALL, **options)
        assert not engine.cuda_graphs  # graphs are CUDA-only and switch off on the CPU
        assert (engine.segment(images) == base).mean() >= 0.999
        assert engine.stats["graph_replays"] == 0 and engine.stats["graph_misses"] == 0


def test_engine_input_checks_and_dtypes(net):
    engine = SegmentationEngine(net, "cpu", scale=SMALL)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        engine.segment(np.zeros((8, 8, 3), np.uint8))
    assert engine.dtype == torch.float32
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float32  # reduced precision is CUDA-only
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", torch.device("cpu"))


def test_segmenter_weights_resolution(r18_checkpoint):
    assert Segmenter("bisenetv1_r18", weights="random", scale=SMALL).predict(np.zeros((16, 16, 3), np.uint8)).shape == (
        16,
        16,
    )
    with pytest.raises(ValueError, match="is a bisenetv1_r50"):
        Segmenter("bisenetv1_r18", weights="bisenetv1_r50_4x4_in1k")
    seg = Segmenter("bisenetv1_r18", weights=r18_checkpoint, scale=SMALL)
    assert seg.classes == ("a",) * 19 and len(seg.palette) == 19


# -- CUDA graphs (GPU only) --------------------------------------------------------------------


@gpu
def test_cuda_graph_replay_equals_eager(net, crops):
    eager = SegmentationEngine(net, "cuda", "fp32", cuda_graphs=False, scale=SMALL)
    graphs = SegmentationEngine(net, "cuda", "fp32", cuda_graphs=True, buckets=(1, 2, 4), scale=SMALL)
    shape = crops[0].shape[:2]
    graphs.warmup([shape])
    assert [(g["height"], g["width"], g["buckets"]) for g in graphs.stats["graphs"]] == [(*shape, [1, 2, 4])]
    rng = np.random.default_rng(0)
    for n in (1, 3, 4, 2):  # 3 is padded to the bucket of 4
        batch = np.stack([np.roll(crops[0], int(s), axis=1) for s in rng.integers(0, 128, n)])
        before = graphs.replays
        out = graphs.segment(batch)
        assert graphs.replays == before + 1 and out.shape == (n, *shape)
        assert (out == eager.segment(batch)).mean() >= 0.999
    assert graphs.misses == 0 and graphs.bucket_for(3) == 4 and graphs.bucket_for(9) == 4
    assert graphs.stats["graphs"][0]["warm"] and graphs.stats["graphs"][0]["bytes"]["4"] > 0


@gpu
def test_cuda_graph_lazy_capture_and_misses(net, crops):
    limits = CaptureLimits(lazy_after=3)
    engine = SegmentationEngine(net, "cuda", "fp16", buckets=(1, 2), capture_limits=limits, scale=SMALL)
    image = crops[1][None]
    for _ in range(2):
        engine.segment(image)
    assert engine.misses == 2 and engine.replays == 0 and engine.stats["graphs"] == []
    engine.segment(image)  # third time: eager, then every bucket captured after the batch
    assert engine.misses == 3 and engine.stats["graphs"][0]["buckets"] == [1, 2]
    engine.segment(np.repeat(image, 2, axis=0))
    assert engine.replays == 1
    engine.segment(np.repeat(image, 5, axis=0))  # larger than the largest bucket: eager, a miss
    assert engine.misses == 4 and engine.replays == 1


@gpu
def test_cuda_flip_graphs_equal_eager(net, crops):
    eager = SegmentationEngine(net, "cuda", "fp32", cuda_graphs=False, scale=SMALL)
    limits = CaptureLimits(lazy_after=1)
    graphs = SegmentationEngine(net, "cuda", "fp32", buckets=(1, 2), capture_limits=limits, scale=SMALL)
    batch = np.stack([crops[0], np.roll(crops[0], 31, axis=1)])
    first = graphs.segment(batch, tta="flip")  # eager, then captured right after (the Python API)
    assert graphs.misses == 1 and [g["tta"] for g in graphs.stats["graphs"]] == ["flip"]
    again = graphs.segment(batch, tta="flip")
    assert graphs.replays == 1
    reference = eager.segment(batch, tta="flip")
    assert (first == reference).mean() >= 0.999 and (again == reference).mean() >= 0.999


@gpu
def test_cuda_fp16_close_to_fp32(net, photo):
    fp32 = SegmentationEngine(net, "cuda", "fp32", cuda_graphs=False).segment(photo[None])
    for dtype in ("fp16", "bf16"):
        out = SegmentationEngine(net, "cuda", dtype).segment(photo[None])
        assert (out == fp32).mean() >= 0.98, dtype


# -- the benchmark does not rot --------------------------------------------------------------


def test_bench_runs_on_cpu(capsys):
    from model import bench

    argv = ["--models", "bisenetv1_r18", "--height", "32", "--width", "64", "--batches", "1", "2", "--iters", "1"]
    argv += ["--warmup", "0", "--variants", "eager", "fold", "channels_last", "fp16", "graphs", "batch", "engine"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "| R18 | eager (mmseg-style) | 1 | fp32 |" in out and "| R18 | + BN folding | 1 | fp32 |" in out
    assert "skipped: CUDA only" in out and "engine.segment (host->host) | 2 |" in out
    assert "failed" not in out
