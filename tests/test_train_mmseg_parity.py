"""Training-side parity with a real mmsegmentation 1.x: `make test` runs this file in
.venv-parity/ (mmseg 1.2.2, built by the Makefile; `make test-parity` runs just the parity files)
with BISENET_REQUIRE_MMSEG=1, where a missing mmseg is a failure; elsewhere it skips.

- checkpoints written by `model.train` load strictly into mmseg's own BiSeNetV1 with their classes;
- single-scale and multi-scale + flip predictions of `model.evaluate` equal mmseg's (SegTTAModel);
- `model.iou` equals mmseg's IoUMetric and the decode loss equals the head's `loss_by_feat`;
- the augmentation equals mmseg's RandomResize -> RandomCrop and PhotoMetricDistortion pixel for
  pixel when both are fed the same random draws (their draws come from numpy's global state, ours
  from a Generator); both call OpenCV, mmseg on BGR and ours on RGB.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import mmseg  # noqa: F401
except ImportError as exc:
    if os.environ.get("BISENET_REQUIRE_MMSEG", "") not in ("", "0"):
        pytest.fail(f"BISENET_REQUIRE_MMSEG is set but mmseg cannot be imported: {exc}", pytrace=False)
    pytest.skip("mmseg is not installed (`make test-parity` runs this in .venv-parity)", allow_module_level=True)

# `conftest`, not `tests.conftest`: mmsegmentation's wheel installs a top-level `tests` package
from conftest import load_parity_tool  # noqa: E402
from synthetic_data import CUSTOM_CLASSES, make_cityscapes, make_custom, scene  # noqa: E402

from model.training.augment import PhotoMetricDistortion, TrainTransform  # noqa: E402
from model.training.cityscapes import label_ids_to_train_ids  # noqa: E402
from model.training.config import TrainConfig  # noqa: E402
from model.training.evaluate import load_model, predict_multi_scale, predict_single_scale  # noqa: E402
from model.training.iou import IoUMetric  # noqa: E402
from model.training.train import segmentation_losses, train  # noqa: E402
from model.zoo import CITYSCAPES_CLASSES  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def parity():
    """The parity tool; loading it stubs mmcv.ops (mmcv-lite), which every mmseg import here needs."""
    module = load_parity_tool()
    from mmengine.registry import init_default_scope

    init_default_scope("mmseg")
    return module


def tiny_run(root: Path, work_dir: Path) -> Path:
    cfg = TrainConfig(
        data=str(root),
        work_dir=str(work_dir),
        iters=2,
        batch_size=2,
        crop=(64, 64),
        scale=(128, 64),
        val_interval=0,
        ckpt_interval=2,
        workers=0,
        device="cpu",
        tensorboard=False,
    )
    return train(cfg)


def mmseg_model(parity, checkpoint, num_classes: int = 19):
    from mmengine.config import Config
    from mmengine.model.utils import revert_sync_batchnorm
    from mmseg.apis import init_model

    cfg = Config.fromfile(str(parity.mmseg_config_path("r18")))
    if num_classes != 19:
        cfg.model.decode_head.num_classes = num_classes
        for head in cfg.model.auxiliary_head:
            head.num_classes = num_classes
    return revert_sync_batchnorm(init_model(cfg, str(checkpoint) if checkpoint else None, device="cpu")).eval()


def test_trained_checkpoints_load_strictly_into_mmseg(parity, tmp_path):
    from mmengine.runner import load_checkpoint

    cityscapes = tiny_run(make_cityscapes(tmp_path / "cs", n_train=2, n_val=1), tmp_path / "a")
    model = mmseg_model(parity, None)
    load_checkpoint(model, str(cityscapes), map_location="cpu", strict=True)  # every key, every shape
    assert mmseg_model(parity, cityscapes).dataset_meta["classes"] == CITYSCAPES_CLASSES
    own = tiny_run(make_custom(tmp_path / "own", count=2), tmp_path / "b")
    model = mmseg_model(parity, own, num_classes=3)
    assert list(model.dataset_meta["classes"]) == CUSTOM_CLASSES
    load_checkpoint(model, str(own), map_location="cpu", strict=True)


@pytest.fixture(scope="module")
def models(parity, tmp_path_factory):
    """mmseg's model and ours on the same informative random weights (calibrated BN)."""
    path = parity.make_checkpoint("r18", tmp_path_factory.mktemp("w") / "r18.pth")
    net, _, _ = load_model(str(path), None, torch.device("cpu"))
    return mmseg_model(parity, path), net


def test_single_scale_and_multi_scale_flip_predictions_match_mmseg(parity, models, tmp_path):
    from mmengine.config import Config
    from mmengine.dataset import Compose, pseudo_collate
    from mmseg.apis import inference_model
    from mmseg.models import SegTTAModel
    from PIL import Image

    mm, net = models
    cfg = Config.fromfile(str(parity.mmseg_config_path("r18")))
    tta = SegTTAModel(module=mm)
    pipeline = Compose(cfg.tta_pipeline)
    photo = np.asarray(Image.fromarray(parity.photos()["astronaut"]).resize((160, 120)))
    Image.fromarray(photo).save(tmp_path / "p.png")
    Image.fromarray(np.zeros(photo.shape[:2], np.uint8)).save(tmp_path / "l.png")
    with torch.inference_mode():
        ours = predict_single_scale(net, torch.from_numpy(photo))
        ours_tta = predict_multi_scale(net, torch.from_numpy(photo))
        theirs = inference_model(mm, photo[..., ::-1].copy()).pred_sem_seg.data[0]
        data = pipeline(
            dict(
                img_path=str(tmp_path / "p.png"),
                seg_map_path=str(tmp_path / "l.png"),
                reduce_zero_label=False,
                seg_fields=[],
            )
        )
        theirs_tta = tta.test_step(pseudo_collate([data]))[0].pred_sem_seg.data[0]
    assert ours.shape == theirs.shape == ours_tta.shape == theirs_tta.shape == photo.shape[:2]
    assert (ours == theirs).float().mean() > 0.999
    assert (ours_tta == theirs_tta).float().mean() > 0.999
    assert (ours_tta != ours).any()  # the augmented prediction is a different computation


def test_iou_metric_matches_mmseg():
    from mmseg.evaluation import IoUMetric as MMIoUMetric

    rng = np.random.default_rng(0)
    ours, theirs = IoUMetric(6), MMIoUMetric(iou_metrics=["mIoU"])
    theirs.dataset_meta = {"classes": [f"c{i}" for i in range(6)], "palette": [[i, i, i] for i in range(6)]}
    for _ in range(3):
        label = torch.from_numpy(rng.integers(0, 5, (30, 40)))  # class 5 never labelled
        label[torch.from_numpy(rng.random((30, 40)) < 0.2)] = 255
        pred = torch.from_numpy(rng.integers(0, 6, (30, 40)))
        ours.update(pred, label)
        theirs.process({}, [{"pred_sem_seg": {"data": pred[None]}, "gt_sem_seg": {"data": label[None]}}])
    mine, reference = ours.compute(), theirs.compute_metrics(theirs.results)
    for key in ("aAcc", "mIoU", "mAcc"):  # both rounded to 2 places; mmseg's are float32
        assert mine[key] == pytest.approx(float(reference[key]), abs=1e-4)


def test_decode_loss_matches_mmseg_loss_by_feat(models):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    mm, _ = models
    logits = torch.randn(2, 19, 8, 8)
    label = torch.randint(0, 19, (2, 64, 64))
    label[:, :10] = 255
    samples = [SegDataSample(gt_sem_seg=PixelData(data=lab[None])) for lab in label]
    reference = mm.decode_head.loss_by_feat(logits, samples)["loss_ce"]
    assert segmentation_losses((logits,), label)["decode.loss_ce"].item() == pytest.approx(reference.item(), rel=1e-6)


class ScriptedDraws:
    """Answers both numpy's global API (randint, uniform, random_sample) and a Generator's
    (integers, uniform, random) from one seeded stream, logging every call."""

    def __init__(self, seed: int):
        self.rng, self.calls = np.random.default_rng(seed), []

    def _draw(self, kind, args):
        self.calls.append((kind, tuple(float(a) for a in args)))
        if kind == "int":
            return int(self.rng.integers(*args))
        return float(self.rng.uniform(*args)) if kind == "uniform" else float(self.rng.random())

    def randint(self, *args):
        return self._draw("int", args)

    integers = randint

    def uniform(self, *args):
        return self._draw("uniform", args)

    def random_sample(self, *args):
        return self._draw("float", ())

    random = random_sample


def test_photometric_distortion_matches_mmseg(monkeypatch):
    import mmseg.datasets.transforms.transforms as mm_transforms

    reference = mm_transforms.PhotoMetricDistortion()
    wide, _ = scene(5)
    for seed in range(12):
        # rows of 128 pixels, and of 101 (a view) whose tail leaves OpenCV's 32-pixel vector kernels
        image = wide if seed % 2 else wide[:, :101]
        theirs_draws, our_draws = ScriptedDraws(seed), ScriptedDraws(seed)
        monkeypatch.setattr(mm_transforms, "random", theirs_draws)
        theirs = reference.transform({"img": image[..., ::-1].copy()})["img"][..., ::-1]  # mmseg works on BGR
        ours = PhotoMetricDistortion()(image, our_draws)
        assert our_draws.calls == theirs_draws.calls
        np.testing.assert_array_equal(ours, theirs)


def test_random_resize_and_crop_match_mmseg(monkeypatch):
    from mmcv.transforms import RandomResize
    from mmseg.datasets.transforms import RandomCrop

    image, ids = scene(7)
    label = label_ids_to_train_ids(ids)
    resize = RandomResize(scale=(256, 128), ratio_range=(0.5, 2.0), keep_ratio=True)
    crop = RandomCrop(crop_size=(96, 96), cat_max_ratio=0.75)
    ours_transform = TrainTransform(crop=(96, 96), scale=(256, 128), photometric=None, flip_prob=0.0)
    for seed in range(12):
        theirs_draws, our_draws = ScriptedDraws(seed), ScriptedDraws(seed)
        monkeypatch.setattr(np.random, "random_sample", theirs_draws.random_sample)
        monkeypatch.setattr(np.random, "randint", theirs_draws.randint)
        results = {
            "img": image[..., ::-1].copy(),
            "gt_seg_map": label.copy(),
            "seg_fields": ["gt_seg_map"],
            "img_shape": image.shape[:2],
        }
        results = crop.transform(resize.transform(results))
        monkeypatch.undo()
        img, lab, (h, w) = ours_transform(image, label, our_draws)
        assert our_draws.calls[:-1] == theirs_draws.calls  # ours draws once more, for the flip
        np.testing.assert_array_equal(img[:h, :w], results["img"][..., ::-1])
        np.testing.assert_array_equal(lab[:h, :w], results["gt_seg_map"])
