"""Test-time augmentation in the model (model/tta.py): the passes, and labels against the
multi-scale + flip evaluation path of model/training/evaluate.py, written independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import Segmenter, build_model, load_checkpoint
from model.training.evaluate import predict_multi_scale
from model.tta import MS_RATIOS, TTA_MODES, pass_sizes, work_units

SCALE = (256, 128)


def test_pass_sizes_of_a_cityscapes_frame_are_mmseg_tta_pipeline():
    # mmseg Resize(scale_factor=r, keep_ratio=True) on 2048x1024: (int(2048 r + .5), int(1024 r + .5))
    expected = [(int(1024 * r + 0.5), int(2048 * r + 0.5)) for r in MS_RATIOS]
    assert pass_sizes("ms_flip", 1024, 2048) == expected
    assert pass_sizes("flip", 1024, 2048) == [(1024, 2048)] == pass_sizes("none", 1024, 2048)
    # other sizes: the ratios scale the test-time size (a 512x512 photo is run at 1024x1024 first)
    assert pass_sizes("ms_flip", 512, 512)[2] == (1024, 1024)
    assert work_units("flip", 1024, 2048) == 2 * work_units("none", 1024, 2048)
    assert work_units("ms_flip", 1024, 2048) == pytest.approx(2 * sum(r * r for r in MS_RATIOS) * 2.097152)


def test_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="none, flip, ms_flip"):
        pass_sizes("multi", 64, 64)


@pytest.fixture(scope="module")
def r18(varied_r18_checkpoint):
    net = build_model("bisenetv1_r18").eval()
    load_checkpoint(net, varied_r18_checkpoint)
    return net, Segmenter("bisenetv1_r18", weights=varied_r18_checkpoint, scale=SCALE)


def test_ms_flip_labels_equal_the_evaluation_path(r18, photo, one_torch_thread):
    """On an image at its test-time size, the service's ms_flip (BN folded, passes batched) gives
    the labels of evaluate.predict_multi_scale (the plain network, one pass at a time)."""
    net, segmenter = r18
    image = np.ascontiguousarray(photo[:128, :256])
    with torch.no_grad():
        reference = predict_multi_scale(net, torch.from_numpy(image)).numpy()
    ours = segmenter.predict(image, "ms_flip")
    assert ours.shape == reference.shape == image.shape[:2]
    assert (ours == reference).mean() >= 0.999
    assert len(np.unique(reference)) >= 3  # varied labels: the comparison means something
    flip_only = segmenter.predict(image, "flip")
    with torch.no_grad():
        reference_flip = predict_multi_scale(net, torch.from_numpy(image), ratios=(1.0,)).numpy()
    assert (flip_only == reference_flip).mean() >= 0.999


def test_flip_is_mirror_symmetric_and_batches_agree(r18, photo, one_torch_thread):
    _, segmenter = r18
    image = np.ascontiguousarray(photo[:96, :160])
    labels = segmenter.predict(image, "flip")
    mirrored = segmenter.predict(np.ascontiguousarray(image[:, ::-1]), "flip")
    assert (labels[:, ::-1] == mirrored).mean() >= 0.999  # averaging an image with its mirror
    batch = np.stack([image, np.ascontiguousarray(image[::-1])])
    for mode in TTA_MODES:
        together = segmenter.engine.segment(batch, mode)
        assert np.array_equal(together[0], segmenter.predict(batch[0], mode))
        assert np.array_equal(together[1], segmenter.predict(batch[1], mode))


def test_bench_menu_prints_latency_beside_published_miou(capsys, one_torch_thread):
    from model.bench_menu import main

    assert main(["--models", "bisenetv1_r18", "--size", "32x64", "--resize-scale", "64x32", "--iters", "2"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| bisenet")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [("none", "75.16"), ("flip", "-"), ("ms_flip", "77.24")]
    assert all(float(r[4]) > 0 for r in rows)
