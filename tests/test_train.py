"""Training on the CPU with tiny synthetic datasets: overfitting, exact resume, two-process torchrun,
checkpoint layout, Segmenter loading, the recipe's pieces, and bad input refused before step one."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_data import CUSTOM_CLASSES, CUSTOM_PALETTE, make_cityscapes, make_custom, scene

from model import Segmenter, build_model
from model.checkpoint import CheckpointError
from model.resnet import ResNet
from model.training.cityscapes import label_ids_to_train_ids
from model.training.config import PRESETS, TORCHVISION_RESNET, TrainConfig, build_parser, config_from_args
from model.training.data import DatasetError, open_dataset
from model.training.distributed import state_digest
from model.training.evaluate import evaluate, predict_single_scale
from model.training.schedule import PolyWarmupSchedule
from model.training.snapshots import load_backbone_weights
from model.training.train import StopTraining, apply_sync_bn, segmentation_losses, train
from model.zoo import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from service.cli import main as bisenet

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(data_root, work_dir, **overrides) -> TrainConfig:
    """The recipe at toy scale: 64x128 images kept near their size, R18, CPU, no workers."""
    base = dict(
        data=str(data_root),
        work_dir=str(work_dir),
        iters=6,
        batch_size=2,
        crop=(64, 64),
        scale=(128, 64),
        ratio_range=(0.75, 1.33),
        test_scale=(128, 64),
        val_interval=0,
        ckpt_interval=3,
        log_interval=5,
        workers=0,
        warmup_iters=5,
        lr=0.05,
        device="cpu",
        tensorboard=False,
    )
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory) -> Path:
    root = make_cityscapes(tmp_path_factory.mktemp("data") / "cityscapes", n_train=4, n_val=2, train_ids=False)
    assert bisenet(["prepare-cityscapes", str(root)]) == 0
    return root


@pytest.fixture(scope="module")
def overfit_dir(cityscapes, tmp_path_factory) -> Path:
    work_dir = tmp_path_factory.mktemp("overfit")
    # Overfitting wants the training pixels to be the evaluated ones: no rescaling or colour jitter
    # here (the resume and torchrun tests run the full augmentation).
    settings = dict(iters=80, ckpt_interval=80, val_interval=80, val_split="train", ratio_range=(1.0, 1.0))
    train(tiny(cityscapes, work_dir, photometric=False, **settings))
    return work_dir


def read_scalars(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "scalars.jsonl").read_text().splitlines()]


# -- learning ----------------------------------------------------------------------------------
def test_short_run_overfits_a_few_images(overfit_dir, cityscapes):
    records = read_scalars(overfit_dir)
    losses = [r["loss"] for r in records if r["mode"] == "train"]
    assert len(losses) == 16 and losses[-1] < 0.3 * losses[0]
    final = [r for r in records if r["mode"] == "val"][-1]
    torch.manual_seed(0)
    untrained = evaluate(
        build_model("bisenetv1_r18"),
        open_dataset(cityscapes, "train"),
        torch.device("cpu"),
        scale=(128, 64),
        workers=0,
        show_progress=False,
    )
    # 4 classes are present; an untrained network scores a few percent
    assert final["iter"] == 80 and final["mIoU"] > 60 and final["mIoU"] > 3 * untrained["mIoU"]
    log = (overfit_dir / "train.log").read_text()
    assert "Iter(train) [80/80]" in log and "img/s" in log and "eta" in log and "Iter(val) [80]" in log


def test_checkpoints_have_mmsegmentations_layout(overfit_dir):
    latest = overfit_dir / "latest.pth"
    assert latest.resolve() == (overfit_dir / "iter_80.pth").resolve()
    assert Path((overfit_dir / "last_checkpoint").read_text().strip()) == (overfit_dir / "iter_80.pth").resolve()
    ckpt = torch.load(latest, map_location="cpu", weights_only=True)
    official_keys = list(build_model("bisenetv1_r18").state_dict())  # the official file's 222 keys
    assert list(ckpt["state_dict"]) == official_keys and len(official_keys) == 222
    meta = ckpt["meta"]
    assert meta["CLASSES"] == CITYSCAPES_CLASSES and meta["PALETTE"] == [list(c) for c in CITYSCAPES_PALETTE]
    assert meta["dataset_meta"] == {"classes": CITYSCAPES_CLASSES, "palette": meta["PALETTE"]}
    assert meta["iter"] == 80 and meta["arch"] == "bisenetv1_r18" and json.loads(meta["config"])["iters"] == 80
    assert ckpt["train_state"]["iter"] == 80 and "state" in ckpt["optimizer"]
    assert not list(overfit_dir.glob(".*tmp"))  # atomic writes leave no temporaries


def test_trained_checkpoint_serves_through_segmenter(overfit_dir):
    path = overfit_dir / "latest.pth"
    segmenter = Segmenter("bisenetv1_r18", weights=path, scale=(128, 64))  # the scale it was trained at
    assert segmenter.num_classes == 19 and segmenter.classes == CITYSCAPES_CLASSES
    image, ids = scene(1)  # a training image
    labels = segmenter.predict(image)
    assert labels.shape == image.shape[:2] and set(np.unique(labels)) <= set(range(19))
    expected_ids = label_ids_to_train_ids(ids)
    valid = expected_ids != 255
    assert (labels == expected_ids)[valid].mean() > 0.8  # it learned these images
    net = build_model("bisenetv1_r18", aux_heads=False)
    net.load_state_dict(torch.load(path, weights_only=True)["state_dict"], strict=False)
    with torch.inference_mode():
        expected = predict_single_scale(net.eval(), torch.from_numpy(image), scale=(128, 64)).numpy()
    assert (labels == expected).mean() > 0.99  # Segmenter folds BN: the same model up to rounding


@pytest.fixture(scope="module")
def custom_finetuned(overfit_dir, tmp_path_factory) -> Path:
    """Fine-tuned from the Cityscapes run onto a 3-class dataset of one's own."""
    root = make_custom(tmp_path_factory.mktemp("own") / "own", count=3)
    work_dir = root.parent / "ft"
    path = train(tiny(root, work_dir, iters=2, ckpt_interval=2, load_from=str(overfit_dir / "latest.pth")))
    log = (work_dir / "train.log").read_text()
    heads = "['auxiliary_head.0.conv_seg', 'auxiliary_head.1.conv_seg', 'decode_head.conv_seg']"
    assert f"classifiers {heads} re-initialised" in log
    return path


def test_fine_tuned_checkpoint_has_its_own_classes_in_segmenter(custom_finetuned):
    segmenter = Segmenter("bisenetv1_r18", weights=custom_finetuned, scale=(128, 64))
    assert segmenter.num_classes == 3
    assert segmenter.classes == tuple(CUSTOM_CLASSES) and segmenter.palette == tuple(tuple(c) for c in CUSTOM_PALETTE)
    assert set(np.unique(segmenter.predict(scene(0)[0]))) <= {0, 1, 2}


def test_fine_tuned_checkpoint_is_served_with_its_classes(custom_finetuned):
    from tests.servicekit import FAST_ARGS, Service

    svc = Service([*FAST_ARGS, "--model", f"own-data={custom_finetuned}"])
    try:
        svc.wait_ready()
        info = httpx.get(f"{svc.url}/models").json()["models"][0]
        assert (info["name"], info["arch"], info["classes"]) == ("own-data", "bisenetv1_r18", CUSTOM_CLASSES)
        assert info["palette"] == CUSTOM_PALETTE
        image, _ = scene(2)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        r = httpx.post(f"{svc.url}/segment", content=buf.getvalue(), headers={"Content-Type": "image/png"}, timeout=120)
        assert r.status_code == 200 and r.headers["x-model"] == "own-data"
        expected = Segmenter("own-data", weights=custom_finetuned, scale=(256, 128)).predict(image)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected)
    finally:
        svc.stop()


# -- exact resume and distributed training -----------------------------------------------------
def test_interrupted_and_resumed_run_ends_with_the_same_weights(cityscapes, tmp_path):
    # full augmentation (random resize 0.5-2, crop, flip, photometric) and dropout are all exercised
    settings = dict(iters=4, crop=(64, 64), ratio_range=(0.5, 2.0))
    whole = train(tiny(cityscapes, tmp_path / "whole", ckpt_interval=4, **settings))

    def crash_after_three(done: int) -> None:
        if done == 3:
            raise StopTraining  # the iteration-3 step is lost; the resume restarts from iter_2.pth

    with pytest.raises(StopTraining):
        train(tiny(cityscapes, tmp_path / "parts", ckpt_interval=2, **settings), on_iteration=crash_after_three)
    assert (tmp_path / "parts" / "latest.pth").resolve().name == "iter_2.pth"
    resumed = train(tiny(cityscapes, tmp_path / "parts", ckpt_interval=2, resume="auto", **settings))
    a, b = (torch.load(p, weights_only=True) for p in (whole, resumed))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    moments_a, moments_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(moments_a[i]["momentum_buffer"], moments_b[i]["momentum_buffer"]) for i in moments_a)
    assert "resumed from" in (tmp_path / "parts" / "train.log").read_text()


def test_torchrun_two_processes_hold_the_same_model(cityscapes, tmp_path):
    work_dir = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--no-python",
        str(Path(sys.executable).with_name("bisenet")),
        "train",
        "--data",
        str(cityscapes),
        "--work-dir",
        str(work_dir),
        "--iters",
        "3",
        "--batch-size",
        "2",
        "--crop",
        "64x64",
        "--scale",
        "128x64",
        "--test-scale",
        "128x64",
        "--val-interval",
        "3",
        "--val-split",
        "train",
        "--ckpt-interval",
        "3",
        "--log-interval",
        "1",
        "--workers",
        "0",
        "--warmup-iters",
        "2",
        "--device",
        "cpu",
        "--no-tensorboard",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ckpt = torch.load(work_dir / "iter_3.pth", weights_only=True)
    digests = ckpt["train_state"]["rank_digests"]
    assert ckpt["train_state"]["world_size"] == 2 and len(digests) == 2
    assert digests[0] == digests[1] == state_digest(ckpt["state_dict"])
    log = (work_dir / "train.log").read_text()
    assert "2 process(es) x batch 2" in log and "Iter(val) [3]" in log


def test_bf16_autocast_trains_on_the_cpu(cityscapes, tmp_path):
    path = train(tiny(cityscapes, tmp_path / "bf16", iters=2, ckpt_interval=2, crop=(64, 64), amp="bf16"))
    state = torch.load(path, weights_only=True)["state_dict"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())  # weights stay fp32


# -- the recipe's pieces -----------------------------------------------------------------------
def test_mmcv_schedule_warms_up_then_decays_to_min_lr():
    s = PolyWarmupSchedule(0.025, 160_000)
    poly = lambda i: (0.025 - 1e-4) * (1 - i / 160_000) ** 0.9 + 1e-4
    assert s(0) == pytest.approx(poly(0) * 0.1)
    assert s(500) == pytest.approx(poly(500) * (1 - 0.5 * 0.9))
    assert s(1000) == pytest.approx(poly(1000)) and s(80_000) == pytest.approx(poly(80_000))
    assert s(159_999) == pytest.approx(1e-4, rel=1e-2)


def test_mmengine_schedule_is_linear_then_poly():
    s = PolyWarmupSchedule(0.05, 160_000, style="mmengine")
    assert s(0) == pytest.approx(0.005) and s(999) == pytest.approx(0.05)
    assert s(1000) == pytest.approx(0.05) and s(159_999) == pytest.approx(1e-4)
    assert s(80_500) == pytest.approx(1e-4 + (0.05 - 1e-4) * (1 - 79_500 / 158_999) ** 0.9)


def test_loss_is_the_mean_over_all_pixels_ignored_ones_included():
    logits = torch.randn(1, 3, 2, 2)
    label = torch.tensor([[[0, 1], [255, 255]]])
    decode = segmentation_losses((logits,), label)["decode.loss_ce"]
    ce = torch.nn.functional.cross_entropy(logits, label.clamp(max=2), reduction="none")[0]
    assert decode == pytest.approx(((ce[0, 0] + ce[0, 1]) / 4).item())  # divided by 4, not by 2
    # logits at 1/8 are upsampled to the label size; three heads, aux weight 1
    losses = segmentation_losses([torch.randn(2, 3, 4, 4)] * 3, torch.randint(0, 3, (2, 32, 32)))
    assert list(losses) == ["decode.loss_ce", "aux_0.loss_ce", "aux_1.loss_ce"]


def test_sync_bn_goes_where_mmseg_puts_it():
    net = build_model("bisenetv1_r18")
    apply_sync_bn(net)
    sync = [n for n, m in net.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    plain = [n for n, m in net.named_modules() if type(m) is torch.nn.BatchNorm2d]
    # mmseg's bisenetv1.py builds ContextPath's own layers, SpatialPath and FFM with their default
    # norm_cfg=BN; only the ResNet (20 BN) and the three FCN heads get the config's SyncBN.
    assert len(sync) == 20 + 3 and len(plain) == 7 + 4 + 2
    assert all(n.startswith(("backbone.context_path.backbone.", "decode_head", "auxiliary_head")) for n in sync)
    assert list(net.state_dict()) == list(build_model("bisenetv1_r18").state_dict())


def test_backbone_weights_from_a_torchvision_file(tmp_path):
    resnet = ResNet(18)
    state = {**resnet.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(state, tmp_path / "resnet18.pth")
    net = build_model("bisenetv1_r18")
    report = load_backbone_weights(net, str(tmp_path / "resnet18.pth"))
    assert "120 tensors loaded" in report and "random" not in report
    own = net.state_dict()
    assert all(torch.equal(own[f"backbone.context_path.backbone.{k}"], v) for k, v in resnet.state_dict().items())
    # mmcv's deep-stem ResNetV1c: layer1-4 load, the 7x7 stem stays random (as mmseg's non-strict init)
    v1c = {k: v for k, v in resnet.state_dict().items() if not k.startswith(("conv1", "bn1"))}
    v1c["stem.0.weight"] = torch.zeros(32, 3, 3, 3)
    torch.save({"state_dict": v1c}, tmp_path / "v1c.pth")
    assert "left at random init" in load_backbone_weights(build_model("bisenetv1_r18"), str(tmp_path / "v1c.pth"))
    wrong = {"layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}
    torch.save(wrong, tmp_path / "r50ish.pth")
    with pytest.raises(CheckpointError, match="another depth"):
        load_backbone_weights(build_model("bisenetv1_r18"), str(tmp_path / "r50ish.pth"))


def test_presets_and_overrides():
    parser = build_parser()
    help_text = parser.format_help()
    assert all(name in help_text for name in PRESETS) and len(PRESETS) == 5
    cfg = config_from_args(parser.parse_args([]))
    assert (cfg.preset, cfg.arch, cfg.lr, cfg.batch_size, cfg.iters, cfg.crop) == (
        "bisenetv1_r18_cityscapes",
        "bisenetv1_r18",
        0.025,
        4,
        160_000,
        (1024, 1024),
    )
    assert cfg.backbone_weights is None and cfg.schedule == "mmcv" and cfg.warmup_iters == 1000
    cfg = config_from_args(
        parser.parse_args(
            ["--preset", "bisenetv1_r50_in1k_cityscapes", "--crop", "512x256", "--lr", "0.1", "--amp", "bf16"]
        )
    )
    assert (cfg.arch, cfg.lr, cfg.crop, cfg.amp) == ("bisenetv1_r50", 0.1, (512, 256), "bf16")
    assert cfg.backbone_weights == TORCHVISION_RESNET["bisenetv1_r50"]
    assert PRESETS["bisenetv1_r18_in1k_4x8_cityscapes"].batch_size == 8
    assert PRESETS["bisenetv1_r50_cityscapes"].lr == 0.05
    no_init = config_from_args(
        parser.parse_args(["--preset", "bisenetv1_r18_in1k_cityscapes", "--backbone-weights", "none"])
    )
    assert no_init.backbone_weights is None


# -- bad input: refused with a clear error before the first training step ----------------------
def _break_dataset(kind: str, root: Path, tmp_path: Path, cfg: TrainConfig) -> TrainConfig:
    train_dir = root / "leftImg8bit/train/synth"
    label_dir = root / "gtFine/train/synth"
    first = "synth_000000_000019"
    if kind == "missing folder":
        return dataclasses.replace(cfg, data=str(tmp_path / "absent"))
    if kind == "empty folder":
        (tmp_path / "empty").mkdir()
        return dataclasses.replace(cfg, data=str(tmp_path / "empty"))
    if kind == "image without label":
        (label_dir / f"{first}_gtFine_labelTrainIds.png").unlink()
    elif kind == "label without image":
        (train_dir / f"{first}_leftImg8bit.png").unlink()
    elif kind == "size mismatch":
        Image.fromarray(np.zeros((32, 64), np.uint8)).save(label_dir / f"{first}_gtFine_labelTrainIds.png")
    elif kind == "label values":
        Image.fromarray(np.full((64, 128), 19, np.uint8)).save(label_dir / f"{first}_gtFine_labelTrainIds.png")
    elif kind == "palette length":
        (root / "classes.json").write_text(json.dumps({"classes": list(CITYSCAPES_CLASSES), "palette": [[0, 0, 0]]}))
        return dataclasses.replace(cfg, classes=str(root / "classes.json"))
    elif kind == "batch too large":
        return dataclasses.replace(cfg, batch_size=5)
    return cfg


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing folder", "does not exist"),
        ("empty folder", "is empty"),
        ("image without label", "images without a label: synth/synth_000000_000019"),
        ("label without image", "labels without an image: synth/synth_000000_000019"),
        ("size mismatch", "is 128x64 but its label synth_000000_000019_gtFine_labelTrainIds.png is 64x32"),
        ("label values", r"holds values \[19\] outside 0-18"),
        ("palette length", "the palette has 1 colours for 19 classes"),
        ("batch too large", "batch size 5 x 1 process"),
    ],
)
def test_bad_datasets_fail_before_any_step(kind, message, tmp_path):
    root = make_cityscapes(tmp_path / "cs", n_train=4, n_val=1)
    cfg = _break_dataset(kind, root, tmp_path, tiny(root, tmp_path / "wd"))
    steps = []
    with pytest.raises(DatasetError, match=message):
        train(cfg, on_iteration=steps.append)
    assert steps == [] and not list((tmp_path / "wd").glob("*.pth"))


def test_resume_from_another_model_fails_before_any_step(cityscapes, overfit_dir, tmp_path):
    custom = make_custom(tmp_path / "own", count=2)
    steps = []
    with pytest.raises(CheckpointError, match="it has 19 classes, this run's dataset has 3"):
        train(tiny(custom, tmp_path / "a", resume=str(overfit_dir / "latest.pth")), on_iteration=steps.append)
    other = torch.load(overfit_dir / "latest.pth", weights_only=True)
    other["meta"]["arch"] = "bisenetv1_r50"
    torch.save(other, tmp_path / "r50.pth")
    with pytest.raises(CheckpointError, match="trained as bisenetv1_r50, this run builds bisenetv1_r18"):
        train(tiny(cityscapes, tmp_path / "b", resume=str(tmp_path / "r50.pth")), on_iteration=steps.append)
    torch.save({"state_dict": other["state_dict"]}, tmp_path / "weights_only.pth")
    with pytest.raises(CheckpointError, match="use --load-from"):
        train(tiny(cityscapes, tmp_path / "c", resume=str(tmp_path / "weights_only.pth")), on_iteration=steps.append)
    assert steps == []


def test_skipped_label_check_still_refuses_bad_values_before_a_step(tmp_path):
    root = make_cityscapes(tmp_path / "cs", n_train=2, n_val=1)
    for label in (root / "gtFine/train/synth").glob("*labelTrainIds.png"):
        Image.fromarray(np.full((64, 128), 19, np.uint8)).save(label)
    steps = []
    with pytest.raises(DatasetError, match=r"holds values \[19\] outside 0-18"):
        train(tiny(root, tmp_path / "wd", check_labels=False), on_iteration=steps.append)
    assert steps == []
