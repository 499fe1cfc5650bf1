"""Units of `--decode worker` and greedy batching: the header-only checks, the worker's decoder on
real shared-memory slots, the greedy policy, `bisenet bench decode` and the CPU-time probe."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
from PIL import Image

from service.api import imaging
from service.bench.probe import ServiceProbe, Snapshot, cpu_seconds
from service.errors import ServiceError
from service.worker.decode import FrameDecoder
from service.worker.scheduler import BatchScheduler, Job
from service.worker.shm import SlotMaps, SlotPool


def encode(array: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def picture(photo) -> np.ndarray:
    return np.asarray(Image.fromarray(photo).resize((48, 32)))  # 32 high, 48 wide


def with_orientation(image: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, quality=95, exif=exif)


# -- the header alone ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF"])
def test_header_gives_the_decoded_size_for_every_format(picture, fmt):
    body = encode(picture, fmt)
    header = imaging.read_header(body, max_pixels=10_000)
    assert (header.format, header.height, header.width) == (fmt, 32, 48)
    assert imaging.decode_image(body, 10_000).shape[:2] == (header.height, header.width)


@pytest.mark.parametrize(("orientation", "shape"), [(1, (32, 48)), (3, (32, 48)), (6, (48, 32)), (8, (48, 32))])
def test_header_applies_exif_orientation_to_the_size(picture, orientation, shape):
    body = with_orientation(picture, orientation)
    header = imaging.read_header(body, max_pixels=10_000)
    assert (header.height, header.width, header.orientation) == (*shape, orientation)
    assert imaging.decode_image(body, 10_000).shape[:2] == shape  # what the worker will decode


def test_header_refuses_too_many_pixels_and_other_formats(picture):
    with pytest.raises(ServiceError) as err:
        imaging.read_header(encode(picture, "PNG"), max_pixels=32 * 48 - 1)
    assert err.value.code == "too_large"
    with pytest.raises(ServiceError) as err:
        imaging.read_header(encode(picture, "GIF"), max_pixels=10_000)
    assert err.value.code == "invalid_image" and "GIF" in err.value.message
    for body in (b"", b"\xff\xd8\xff" + bytes(20), np.random.default_rng(0).bytes(500)):
        with pytest.raises(ServiceError) as err:
            imaging.read_header(body, max_pixels=10_000)
        assert err.value.code == "invalid_image"


def test_a_truncated_jpeg_passes_the_header_and_fails_at_decode(picture):
    body = encode(picture, quality=90)
    cut = body[: len(body) * 2 // 3]
    assert imaging.read_header(cut, 10_000).height == 32
    with pytest.raises(ServiceError) as err:
        imaging.decode_image(cut, 10_000)
    assert err.value.code == "invalid_image"


# -- the worker's decoder on shared-memory slots ---------------------------------------------------
@pytest.fixture
def slots():
    pool = SlotPool(64 << 20)
    maps = SlotMaps()
    yield pool, maps
    for name in list(maps._maps):
        maps.forget(name)
    pool.close()


def encoded_job(pool: SlotPool, i: int, body: bytes, shape: tuple[int, int]) -> Job:
    slot = pool.acquire(max(len(body), shape[0] * shape[1]))
    slot.shm.buf[: len(body)] = body
    return Job(i, "m", slot.name, shape[0], shape[1], None, 0.0, encoded=len(body))


def raw_job(pool: SlotPool, i: int, image: np.ndarray) -> Job:
    slot = pool.acquire(image.nbytes)
    slot.write_image(image)
    return Job(i, "m", slot.name, image.shape[0], image.shape[1], None, 0.0)


def test_cpu_decoder_gives_the_front_ends_pixels_and_isolates_failures(slots, picture):
    pool, maps = slots
    jpeg, png = encode(picture, quality=90), encode(picture[::-1].copy(), "PNG")
    batch = [
        encoded_job(pool, 1, jpeg, (32, 48)),
        encoded_job(pool, 2, jpeg[: len(jpeg) // 2], (32, 48)),  # header fine, data cut
        encoded_job(pool, 3, png, (32, 48)),
        raw_job(pool, 4, picture),  # gRPC raw frames may share a batch with encoded ones
        encoded_job(pool, 5, encode(picture[:16], "PNG"), (32, 48)),  # not the size its header had
    ]
    pixels = FrameDecoder("cpu", max_pixels=10_000).load(batch, maps)
    assert [j.id for j in pixels.jobs] == [1, 3, 4]
    assert [image.shape for image in pixels.images] == [(32, 48, 3)] * 3
    np.testing.assert_array_equal(pixels.images[0], imaging.decode_image(jpeg, 10_000))
    np.testing.assert_array_equal(pixels.images[1], picture[::-1])
    np.testing.assert_array_equal(pixels.images[2], picture)
    invalid = {job.id: message for job, message in pixels.invalid}
    assert set(invalid) == {2, 5}
    assert "truncated" in invalid[2] and "header" in invalid[5]


def test_decoder_passes_raw_batches_through(slots, picture):
    pool, maps = slots
    pixels = FrameDecoder("cpu", 10_000).load([raw_job(pool, 1, picture), raw_job(pool, 2, picture)], maps)
    assert pixels.invalid == [] and [image.shape for image in pixels.images] == [(32, 48, 3)] * 2
    np.testing.assert_array_equal(pixels.images[1], picture)
    assert not pixels.images[1].flags.owndata  # views of the slots: raw pixels are not copied


def test_a_batch_of_only_broken_images_has_no_pixels(slots, picture):
    pool, maps = slots
    body = encode(picture, quality=90)[:100]
    pixels = FrameDecoder("cpu", 10_000).load([encoded_job(pool, 1, body, (32, 48))], maps)
    assert pixels.jobs == [] and pixels.images == [] and len(pixels.invalid) == 1


def test_cuda_decoder_sends_only_whole_upright_jpegs_to_nvjpeg(picture):
    """nvJPEG ignores EXIF orientation, and may fill in what a truncated JPEG lacks: rotated and cut
    JPEGs, other formats and broken headers take the CPU path (checked without a GPU: that path
    never touches CUDA or torchvision)."""
    decoder = FrameDecoder("cuda:0", max_pixels=10_000)
    whole = encode(picture, quality=90)
    assert decoder._for_nvjpeg(whole)
    assert decoder._for_nvjpeg(whole + b"\x00\x00")  # zero padding after the end marker
    assert decoder._for_nvjpeg(with_orientation(picture, 1))
    cut = whole[: len(whole) - 40]
    for body in (
        with_orientation(picture, 6),
        with_orientation(picture, 3),
        encode(picture, "PNG"),
        b"\xff\xd8\xff",
        cut,
    ):
        assert not decoder._for_nvjpeg(body)
    assert isinstance(decoder.decode([cut])[0], str)  # refused on the CPU: 400 invalid_image
    rotated = with_orientation(picture, 6)
    frames = decoder.decode([rotated, encode(picture, "PNG")])
    np.testing.assert_array_equal(frames[0], imaging.decode_image(rotated, 10_000))
    assert frames[0].shape == (48, 32, 3)
    np.testing.assert_array_equal(frames[1], picture)


# -- greedy batching ---------------------------------------------------------------------------------
def job(i, shape=(4, 4), arrival=0.0, deadline=None):
    return Job(i, "m", f"slot{i}", shape[0], shape[1], deadline, arrival)


def test_greedy_runs_a_lone_request_at_once_whatever_the_delay():
    s = BatchScheduler(max_batch=4, max_delay=10.0, default_budget=0.1, policy="greedy")
    s.add(job(1, arrival=5.0))
    batch, wait = s.next_batch(now=5.0)
    assert [j.id for j in batch] == [1] and wait is None
    assert s.next_batch(now=5.0) == (None, None)  # nothing queued: sleep until a request arrives


def test_greedy_batches_what_queued_while_the_worker_was_busy():
    s = BatchScheduler(max_batch=3, max_delay=10.0, default_budget=0.1, policy="greedy")
    for i in range(5):  # arrived while the previous batch ran
        s.add(job(i, arrival=0.01 * i))
    s.add(job(9, shape=(8, 8), arrival=0.0, deadline=0.06))
    sizes = []
    while len(s):
        batch, _ = s.next_batch(now=0.05)
        sizes.append((batch[0].key, len(batch)))
    # the most urgent group first (its explicit deadline), then full batches of the other shape
    assert sizes == [(("m", "none", 8, 8), 1), (("m", "none", 4, 4), 3), (("m", "none", 4, 4), 2)]


def test_wait_policy_still_waits_and_unknown_policies_are_refused():
    s = BatchScheduler(max_batch=4, max_delay=0.5, default_budget=0.1, policy="wait")
    s.add(job(1, arrival=0.0))
    batch, wait = s.next_batch(now=0.1)
    assert batch is None and wait == pytest.approx(0.4)
    with pytest.raises(ValueError, match="batching policy"):
        BatchScheduler(4, 0.5, 0.1, policy="eager")


# -- bench decode and the CPU-time probe -------------------------------------------------------------
def test_bench_decode_on_cpu_reports_identical_labels(capsys):
    from service.bench.decode import main

    argv = ["--device", "cpu", "--weights", "random", "--size", "64x96", "--resize-scale", "128x64"]
    assert main([*argv, "--photos", "2", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "Pillow (same function as the front end)" in out
    rows = [line for line in out.splitlines() if line.startswith("| astronaut") or line.startswith("| coffee")]
    assert rows == ["| astronaut | 0 | 0.000 | 100.0000% |", "| coffee | 0 | 0.000 | 100.0000% |"]
    assert "decode ms per image" in out


def test_cpu_seconds_counts_this_process():
    before = cpu_seconds(os.getpid())
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    assert cpu_seconds(os.getpid()) - before >= 0.1
    assert cpu_seconds(2**22 + 12345) == 0.0  # no such process


def test_probe_cost_per_frame_less_the_idle_rate():
    probe = ServiceProbe(url=None, front_pid=1)
    cost = probe.cost(Snapshot(1.0, 2.0, 10, 5, wall=0.0), Snapshot(1.5, 4.0, 22, 9, wall=10.0), frames=100)
    assert cost.front_ms_per_frame == pytest.approx(5.0)
    assert cost.worker_ms_per_frame == pytest.approx(20.0)
    assert cost.mean_batch == pytest.approx(3.0)
    probe.idle_front, probe.idle_worker = 0.02, 0.5  # CPU s per s: 0.2 s and 5 s over the 10 s level
    cost = probe.cost(Snapshot(1.0, 2.0, 10, 5, wall=0.0), Snapshot(1.5, 4.0, 22, 9, wall=10.0), frames=100)
    assert cost.front_ms_per_frame == pytest.approx(3.0)
    assert cost.worker_ms_per_frame == 0.0  # never below zero
    assert ServiceProbe(None, None).cost(Snapshot(0, 0, 0, 0), Snapshot(1, 1, 0, 0), 10).front_ms_per_frame is None
