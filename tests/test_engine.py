"""The engine's decisions, tested on the CPU: device spellings, CPU bf16, the CUDA-graph capture
policy, failure classification, bucket validation, and the pipelined host path (batches in
flight land in the right output arrays). CUDA-graph routing runs here with a stand-in for
torch.cuda.CUDAGraph (it replays the eager pipeline), so the engine's own logic is exercised."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import gpu

from model import transforms
from model.device_errors import fatal_device_error, is_out_of_memory
from model.devices import check_cpu_bf16, cpu_flags, cpu_has_native_bf16, resolve_device
from model.graph_policy import CaptureLimits, CapturePolicy, validate_buckets
from model.pipeline import HostDevicePipeline
from model.runtime import SegmentationEngine, _Graph, resolve_dtype
from service.config import ConfigError, load_settings

SMALL = (256, 128)


@pytest.fixture(scope="module")
def net(varied_r18_net):
    return varied_r18_net


@pytest.fixture(scope="module")
def crops(photo):
    return [
        np.ascontiguousarray(photo[:64, :128]),
        np.ascontiguousarray(photo[100:148, 50:130]),
        np.ascontiguousarray(photo[7:102, 11:38]),
    ]


# -- devices and precision -------------------------------------------------------------------------
def test_device_spellings():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad, message in (("tpu", "unknown device"), ("cuda:x", "unknown device"), ("meta", "unsupported device")):
        with pytest.raises(ValueError, match=message):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("spelling", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_gpu_is_a_clear_error(net, spelling):
    with pytest.raises(ValueError, match="no CUDA device is available"):
        SegmentationEngine(net, spelling)


@gpu
def test_cuda_spellings_on_gpu(net):
    assert resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    engine = SegmentationEngine(net, "cuda", "fp16", scale=SMALL)  # no index: used to raise in set_device
    assert engine.device.index is not None


def test_cpu_bf16_needs_native_support(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert cpu_flags(str(cpuinfo)) == {"fpu", "sse2", "avx2", "avx512f"}
    assert not cpu_has_native_bf16(cpu_flags(str(cpuinfo)))
    with pytest.raises(ValueError, match="avx512_bf16 or AMX"):
        check_cpu_bf16({"avx2", "avx512f"})
    check_cpu_bf16({"avx512f", "avx512_bf16"})
    check_cpu_bf16({"amx_bf16", "amx_tile"})
    assert cpu_flags(str(tmp_path / "missing")) == set()


def test_cpu_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32  # parity with mmseg stays the default
    assert resolve_dtype("fp16", cpu) == torch.float32  # float16 is CUDA-only: falls back
    if cpu_has_native_bf16():
        assert resolve_dtype("bf16", cpu) == torch.bfloat16
    else:
        with pytest.raises(ValueError, match="native bf16"):
            resolve_dtype("bf16", cpu)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")
@pytest.mark.parametrize("tta", ["none", "flip", "ms_flip"])
def test_cpu_bf16_labels_agree_with_fp32(net, photo, tta):
    """Every mode runs under the autocast (TTA once fed bf16 inputs to the fp32 weights and failed)."""
    image = np.ascontiguousarray(photo[:256, :512])
    fp32 = SegmentationEngine(net, "cpu", "fp32", scale=SMALL)
    bf16 = SegmentationEngine(net, "cpu", "bf16", scale=SMALL)
    assert bf16.dtype == torch.bfloat16 and bf16.cpu_autocast and bf16.channels_last
    a, b = fp32.segment(image[None], tta), bf16.segment(image[None], tta)
    assert a.shape == b.shape == (1, 256, 512)
    assert (a == b).mean() >= 0.95


# -- failure classification --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("CUDA error: an illegal memory access was encountered", "illegal_address"),
        ("CUDA error: device-side assert triggered", "device_assert"),
        ("CUDA error: unspecified launch failure", "launch_failure"),
        ("CUDA error: uncorrectable ECC error encountered", "ecc_error"),
        ("NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus", "gpu_lost"),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", None),
        ("Expected all tensors to be on the same device", None),
    ],
)
def test_fatal_device_errors_are_classified_by_message(message, reason):
    assert fatal_device_error(RuntimeError(message)) == reason


def test_out_of_memory_is_not_fatal():
    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    assert is_out_of_memory(exc) and fatal_device_error(exc) is None


# -- buckets -------------------------------------------------------------------------------------------
def test_buckets_are_validated_after_filtering():
    assert validate_buckets((16, 1, 2, 4, 8, 8), 8) == (1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"must include max batch 8 \(16 exceed it\)"):
        validate_buckets((1, 2, 4, 16), 8)
    with pytest.raises(ValueError, match=">= 1"):
        validate_buckets((0, 8), 8)
    with pytest.raises(ConfigError, match="must include max batch 8"):
        load_settings(["--max-batch", "8", "--batch-buckets", "1,2,4,16"])
    assert load_settings(["--max-batch", "8", "--batch-buckets", "1,2,4,8,16"]).batch_buckets == (1, 2, 4, 8)
    assert load_settings(["--max-batch", "6"]).batch_buckets == (1, 2, 4, 6)


def test_lazy_capture_flags():
    settings = load_settings(["--lazy-capture-shapes", "0", "--lazy-capture-pixels", "4096"])
    assert settings.lazy_capture_shapes == 0 and settings.lazy_capture_pixels == 4096
    with pytest.raises(ConfigError, match="lazy-capture-shapes"):
        load_settings(["--lazy-capture-shapes", "-1"])


def test_cpu_threads_flag():
    assert load_settings([]).cpu_threads == 0  # torch's default: one per core
    assert load_settings(["--cpu-threads", "3"]).cpu_threads == 3
    with pytest.raises(ConfigError, match="cpu-threads"):
        load_settings(["--cpu-threads", "-1"])


# -- the capture policy --------------------------------------------------------------------------------
def test_policy_queues_a_shape_after_repeated_sightings_and_never_captures_inline():
    policy = CapturePolicy(CaptureLimits(lazy_after=3))
    assert [policy.route((64, 128)) for _ in range(3)] == [False, False, False]
    assert policy.next_queued() == (64, 128)
    assert not policy.route((64, 128))  # still eager until the worker captures it while idle
    assert policy.captured((64, 128)) == []
    assert policy.route((64, 128)) and policy.next_queued() is None


def test_policy_bounds_lazy_shapes_and_keeps_warm_ones():
    policy = CapturePolicy(CaptureLimits(lazy_after=1, max_lazy_shapes=2))
    policy.captured((1024, 2048), warm=True)
    for shape in ((10, 10), (20, 20)):
        policy.route(shape)
        assert policy.captured(shape) == []
    policy.route((10, 10))  # used again: (20, 20) is now the least recently used
    policy.route((30, 30))
    assert policy.captured((30, 30)) == [(20, 20)]
    assert policy.is_captured((1024, 2048)) and policy.is_captured((10, 10)) and not policy.is_captured((20, 20))


def test_policy_pixel_limit_failures_and_bounded_counters():
    policy = CapturePolicy(CaptureLimits(lazy_after=1, max_lazy_pixels=100 * 100, max_tracked=8))
    policy.route((101, 100))
    assert policy.next_queued() is None  # too large to capture lazily: eager for good
    policy.route((50, 50))
    policy.capture_failed((50, 50), "OutOfMemoryError")
    for _ in range(3):
        assert not policy.route((50, 50))
    assert policy.next_queued() is None and policy.failed == {(50, 50): "OutOfMemoryError"}
    counting = CapturePolicy(CaptureLimits(lazy_after=99, max_tracked=8))
    for i in range(1000):
        counting.route((i + 1, 7))
    assert len(counting._sightings) == 8
    assert not CapturePolicy(CaptureLimits(lazy_after=1, max_lazy_shapes=0)).route((8, 8))


# -- the engine's graph routing, with a stand-in for CUDAGraph -------------------------------------------
class ReplaysEager:
    """Stands in for torch.cuda.CUDAGraph on the CPU: replay() recomputes into the static output."""

    def __init__(self, engine, static_in, tta):
        self.engine, self.static_in, self.tta = engine, static_in, tta
        with torch.inference_mode():
            self.output = engine._pipeline(static_in, tta)

    def replay(self):
        with torch.inference_mode():
            self.output.copy_(self.engine._pipeline(self.static_in, self.tta))


def graph_engine(net, monkeypatch, fail_at: int | None = None, **limits):
    engine = SegmentationEngine(
        net, "cpu", "fp32", buckets=(1, 2, 4), scale=SMALL, capture_limits=CaptureLimits(**limits)
    )
    engine.cuda_graphs = True  # the routing below is device-independent
    captured = []

    def capture_one(static_in, tta):
        captured.append(static_in.shape[0] if tta == "none" else (static_in.shape[0], tta))
        if fail_at is not None and static_in.shape[0] == fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.3 GiB")
        fake = ReplaysEager(engine, static_in, tta)
        return _Graph(fake, static_in, fake.output, 1000 * static_in.shape[0])

    monkeypatch.setattr(engine, "_capture_one", capture_one)
    return engine, captured


def test_engine_captures_every_bucket_and_replays_padded_batches(net, monkeypatch, crops):
    engine, captured = graph_engine(net, monkeypatch)
    eager = SegmentationEngine(net, "cpu", "fp32", scale=SMALL)
    shape = crops[0].shape[:2]
    engine.warmup([shape])
    assert captured == [4, 2, 1]  # largest first, all buckets
    graphs = engine.stats["graphs"]
    assert graphs == [
        {
            "height": shape[0],
            "width": shape[1],
            "tta": "none",
            "warm": True,
            "buckets": [1, 2, 4],
            "bytes": {"1": 1000, "2": 2000, "4": 4000},
        }
    ]
    for n in (3, 1, 4):  # 3 pads to the bucket of 4
        batch = np.stack([np.roll(crops[0], 9 * i, axis=1) for i in range(n)])
        assert np.array_equal(engine.segment(batch), eager.segment(batch))
    assert engine.replays == 3 and engine.misses == 0
    engine.segment(np.repeat(crops[0][None], 5, axis=0))  # above the largest bucket: eager, a miss
    assert engine.misses == 1


def test_engine_lazy_capture_waits_for_an_idle_moment(net, monkeypatch, crops):
    engine, captured = graph_engine(net, monkeypatch, lazy_after=2)
    engine.capture_inline = False  # as in the worker
    image = crops[1][None]
    for _ in range(3):
        engine.segment(image)
    assert engine.misses == 3 and captured == []  # queued, not captured on the request path
    assert not engine.capture_pending(should_stop=lambda: True) and captured == []
    assert engine.capture_pending() and captured == [4, 2, 1]
    engine.segment(np.repeat(image, 2, axis=0))
    assert engine.replays == 1 and engine.misses == 3


def test_engine_capture_stopped_between_buckets_resumes_later(net, monkeypatch, crops):
    engine, captured = graph_engine(net, monkeypatch, lazy_after=1)
    engine.capture_inline = False
    engine.segment(crops[2][None])
    asked = iter([False, True])
    assert not engine.capture_pending(should_stop=lambda: next(asked))
    assert captured == [4] and engine.stats["graphs"] == []  # not usable until every bucket exists
    assert engine.capture_pending() and captured == [4, 2, 1]


def test_failed_capture_leaves_the_shape_eager(net, monkeypatch, crops, caplog):
    engine, captured = graph_engine(net, monkeypatch, fail_at=2)
    shape = crops[0].shape[:2]
    engine.warmup([shape])
    assert captured == [4, 2] and engine.capture_failures == 1 and engine.stats["graphs"] == []
    assert "capture for" in caplog.text and "runs eagerly" in caplog.text
    out = engine.segment(crops[0][None])
    assert out.shape == (1, *shape) and engine.misses == 1
    assert engine.capture_pending() is False and captured == [4, 2]  # never retried


def test_context_poisoning_error_during_capture_is_raised(net, monkeypatch, crops):
    engine, _ = graph_engine(net, monkeypatch)

    def poisoned(static_in, tta):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine, "_capture_one", poisoned)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.warmup([crops[0].shape[:2]])


def test_flip_batches_get_graphs_of_their_own_and_ms_flip_runs_eagerly(net, monkeypatch, crops):
    engine, captured = graph_engine(net, monkeypatch, lazy_after=2)
    eager = SegmentationEngine(net, "cpu", "fp32", scale=SMALL)
    engine.capture_inline = False
    shape = crops[0].shape[:2]
    engine.warmup([shape])
    batch = np.stack([crops[0], np.roll(crops[0], 17, axis=1)])
    for _ in range(2):  # flip: eager, a miss each time, queued after the second
        assert np.array_equal(engine.segment(batch, tta="flip"), eager.segment(batch, tta="flip"))
    assert engine.misses == 2 and engine.capture_pending()
    assert captured == [4, 2, 1, (4, "flip"), (2, "flip"), (1, "flip")]
    assert np.array_equal(engine.segment(batch, tta="flip"), eager.segment(batch, tta="flip"))
    assert np.array_equal(engine.segment(batch), eager.segment(batch))  # the none graphs still replay
    assert engine.replays == 2 and engine.misses == 2
    graphs = {g["tta"]: g for g in engine.stats["graphs"]}
    assert graphs["none"]["warm"] and not graphs["flip"]["warm"] and graphs["flip"]["buckets"] == [1, 2, 4]
    # both read the one static input of the shape; dropping one set of graphs keeps it for the other
    users = engine.resources.users[(*shape, 4)]  # (other tests' engines may share the device's input)
    assert {(id(engine), "none"), (id(engine), "flip")} <= users
    engine._drop_graphs((*shape, "flip"))
    assert (*shape, 4) in engine.resources.inputs
    for _ in range(3):  # ms_flip: eager by design, never a miss and never queued
        assert np.array_equal(engine.segment(batch[:1], tta="ms_flip"), eager.segment(batch[:1], tta="ms_flip"))
    assert engine.misses == 2 and engine.policy.next_queued() is None


def test_evicted_and_failed_shapes_free_their_static_inputs(net, monkeypatch, crops):
    engine, _ = graph_engine(net, monkeypatch, lazy_after=1, max_lazy_shapes=1)
    engine.capture_inline = False
    first, second = crops[0].shape[:2], crops[2].shape[:2]
    engine.segment(crops[0][None])
    assert engine.capture_pending()
    users = engine.resources.users
    me = (id(engine), "none")
    assert me in users[(*first, 4)]
    engine.segment(crops[2][None])
    assert engine.capture_pending()  # the second lazy shape evicts the first
    assert [(g["height"], g["width"]) for g in engine.stats["graphs"]] == [second]
    assert me not in users.get((*first, 4), set()) and me in users[(*second, 4)]
    failing, _ = graph_engine(net, monkeypatch, fail_at=1)
    failing.warmup([crops[1].shape[:2]])
    assert (id(failing), "none") not in users.get((*crops[1].shape[:2], 4), set())


def test_an_engine_that_is_gone_releases_its_static_inputs(net):
    engine = SegmentationEngine(net, "cpu", buckets=(1, 2), scale=SMALL)
    resources, gone = engine.resources, id(engine)
    resources.static_input((12, 34), 2, (gone, "none"))  # what captures of 12x34 register
    resources.static_input((12, 34), 2, (gone, "flip"))
    assert resources.users[(12, 34, 2)] == {(gone, "none"), (gone, "flip")}
    del engine
    gc.collect()
    assert (12, 34, 2) not in resources.users and (12, 34, 2) not in resources.inputs


def test_models_on_one_device_share_its_resources(net):
    a = SegmentationEngine(net, "cpu", scale=SMALL)
    b = SegmentationEngine(net, "cpu", scale=SMALL)
    assert a.resources is b.resources


# -- labels: one image (and for large images a few channels) at a time, same labels ------------------
def _whole_batch_labels(logits, size, output):
    """The plain computation, as mmsegmentation runs it: the whole batch's full-size NCHW fp32 logits,
    then one argmax."""
    x = F.interpolate(logits.float().contiguous(), size=size, mode="bilinear", align_corners=False)
    return F.interpolate(x, size=output, mode="bilinear", align_corners=False).argmax(dim=1).to(torch.uint8)


def test_engine_labels_equal_whole_batch_labels(net, crops):
    engine = SegmentationEngine(net, "cpu", "fp32", scale=SMALL)
    batch = torch.from_numpy(np.stack([crops[0], np.flip(crops[0], 1).copy(), crops[0][::-1].copy()]))
    size = transforms.test_size(*batch.shape[1:3], SMALL)
    with torch.inference_mode():
        whole = _whole_batch_labels(engine.net(transforms.normalise(batch, size)), size, batch.shape[1:3])
        assert torch.equal(engine.run_device(batch), whole)


@pytest.mark.parametrize("channels_last", [False, True])
def test_labels_in_channel_groups_equal_one_argmax(monkeypatch, channels_last):
    """Small `chunk_bytes` splits the 19 channels into groups; ties (integer logits) keep the first class.
    channels_last logits give the NCHW labels too (its interpolation kernel rounds differently)."""
    logits = torch.randint(-3, 4, (2, 19, 9, 13)).float()  # many exact ties between classes
    logits[0, 5] = 9.0  # one class ahead everywhere in image 0, in the middle of a group
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    size, output = (72, 104), (150, 230)
    seen = []
    real = F.interpolate
    monkeypatch.setattr(transforms.F, "interpolate", lambda x, **kw: seen.append(x.shape[1]) or real(x, **kw))
    grouped = transforms.logits_to_labels(logits, size, output, chunk_bytes=3 * 4 * 150 * 230)
    assert max(seen) == 3 and len(seen) == 2 * 2 * 7  # 2 images x 7 groups x 2 resizes
    assert torch.equal(grouped, _whole_batch_labels(logits, size, output))
    assert (grouped[0] == 5).all() and len(grouped[1].unique()) > 10
    seen.clear()
    assert torch.equal(transforms.logits_to_labels(logits, size, output), grouped)
    assert max(seen) == 19  # small images: all channels at once


# -- the pipelined host path ----------------------------------------------------------------------------
def test_pipeline_results_land_in_their_slots_with_batches_in_flight():
    """Interleaved views of one shared buffer, several batches submitted before any wait."""
    rng = np.random.default_rng(1)
    pipeline = HostDevicePipeline(torch.device("cpu"), depth=2)
    shm = np.zeros(12 * 4096, np.uint8)  # 12 slots of 4 KiB, like the worker's slot maps
    inputs, outputs = [], []
    for slot in range(12):
        h, w = (16, 20) if slot < 6 else (8, 30)
        region = shm[slot * 4096 : (slot + 1) * 4096]
        region[: h * w * 3] = rng.integers(0, 256, h * w * 3, dtype=np.uint8)
        inputs.append(region[: h * w * 3].reshape(h, w, 3).copy())
        outputs.append(region[: h * w].reshape(h, w))  # labels overwrite the start of the same slot

    def red_plus_one(x):
        return x[..., 0] + 1

    handles = [
        pipeline.submit(
            red_plus_one,
            [shm[s * 4096 :][: 16 * 20 * 3].reshape(16, 20, 3) for s in (0, 2, 4)],
            [outputs[s] for s in (0, 2, 4)],
        ),
        pipeline.submit(
            red_plus_one,
            [shm[s * 4096 :][: 8 * 30 * 3].reshape(8, 30, 3) for s in (7, 9)],
            [outputs[s] for s in (7, 9)],
        ),
        pipeline.submit(
            red_plus_one,
            [shm[s * 4096 :][: 16 * 20 * 3].reshape(16, 20, 3) for s in (1, 3, 5)],
            [outputs[s] for s in (1, 3, 5)],
        ),
    ]
    for handle in handles:
        handle.wait()
        assert handle.ready()
    for slot in (0, 1, 2, 3, 4, 5, 7, 9):
        assert np.array_equal(outputs[slot], inputs[slot][..., 0] + 1), slot
    for slot in (6, 8, 10, 11):  # untouched slots keep their pixels
        h, w = 8, 30
        assert np.array_equal(shm[slot * 4096 :][: h * w * 3].reshape(h, w, 3), inputs[slot])
    with pytest.raises(ValueError, match="as many outputs"):
        pipeline.submit(red_plus_one, inputs[:2], outputs[:1])


def test_engine_submit_writes_labels_into_host_views(net, crops):
    engine = SegmentationEngine(net, "cpu", "fp32", scale=SMALL)
    images = [crops[0], np.ascontiguousarray(np.flip(crops[0], 0))]
    expected = engine.segment(np.stack(images))
    out = np.full((2, *crops[0].shape[:2]), 255, np.uint8)
    frozen = [im.copy() for im in images]
    for im in frozen:
        im.flags.writeable = False  # read-only inputs are fine: they are only read
    engine.submit(frozen, list(out)).wait()
    assert np.array_equal(out, expected)


@gpu
def test_cuda_pipeline_overlaps_and_matches_eager(net, crops):
    eager = SegmentationEngine(net, "cuda", "fp32", cuda_graphs=False, scale=SMALL)
    graphs = SegmentationEngine(net, "cuda", "fp32", buckets=(1, 2, 4), scale=SMALL, capture_inline=False)
    shape = crops[0].shape[:2]
    graphs.warmup([shape])
    batches = [np.stack([np.roll(crops[0], 7 * (i + j), axis=1) for j in range(1 + i % 4)]) for i in range(8)]
    outs = [np.zeros(b.shape[:3], np.uint8) for b in batches]
    handles = [graphs.submit(list(b), list(o)) for b, o in zip(batches, outs)]
    for h in handles:
        h.wait()
    for b, o in zip(batches, outs):
        assert (o == eager.segment(b)).mean() >= 0.999
    assert graphs.replays == 8 and graphs.misses == 0
    assert graphs.stats["graphs"][0]["bytes"]["4"] > 0  # the largest bucket's graph grew the pool


@gpu
def test_cuda_graph_of_a_large_image_holds_channel_groups_not_all_logits(net, photo):
    """3000x4000 output: 19 full-size fp32 planes would be 912 MB of graph pool; groups of 5 keep it lower."""
    image = np.ascontiguousarray(np.tile(photo, (8, 8, 1))[:3000, :4000])
    plane = 4 * 3000 * 4000
    graphs = SegmentationEngine(net, "cuda", "fp32", buckets=(1,), scale=SMALL, capture_inline=False)
    graphs.warmup([image.shape[:2]])
    eager = SegmentationEngine(net, "cuda", "fp32", cuda_graphs=False, scale=SMALL)
    assert (graphs.segment(image[None]) == eager.segment(image[None])).mean() >= 0.999
    assert graphs.replays == 1 and graphs.misses == 0
    assert 0 < graphs.stats["graphs"][0]["bytes"]["1"] < 19 * plane
