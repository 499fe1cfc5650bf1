"""mIoU of a checkpoint on a dataset: single scale and multi-scale + flip, as mmsegmentation.

Single scale is the test pipeline of docs/model.md ("Test-time path") (model/transforms.py): resize to
`test_size` (2048x1024 scale), normalise, network, logits resized bilinearly to the network input
and then to the original size, argmax.
Multi-scale + flip is SegTTAModel with the Cityscapes tta_pipeline: the image is rescaled by each
ratio (0.5 ... 1.75, keep_ratio, relative to its own size) with and without a horizontal flip;
each pass's logits are resized to its input, un-flipped, resized to the original size and turned
into probabilities; the softmax averages are argmaxed.

    bisenet evaluate work_dirs/x/latest.pth --data data/cityscapes [--aug-test]
    bisenet evaluate bisenetv1_r18_4x4_in1k --data data/cityscapes   # a zoo checkpoint
Under torchrun the images are split over the processes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..bisenet import build_model
from ..checkpoint import CheckpointError, load_checkpoint, num_classes_of, read_state_dict
from ..predictor import infer_arch
from ..transforms import TEST_SCALE, logits_to_labels, normalise, test_size
from ..zoo import ZOO
from .config import size_pair
from .data import DatasetError, DatasetInfo, EvalDataset, open_dataset
from .distributed import DistEnv, cleanup_distributed, init_distributed
from .iou import IoUMetric, format_table

TTA_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def predict_single_scale(
    net: torch.nn.Module, image: torch.Tensor, scale: tuple[int, int] = TEST_SCALE
) -> torch.Tensor:
    """uint8 (H, W, 3) RGB on the model's device -> (H, W) labels."""
    height, width = image.shape[:2]
    size = test_size(height, width, scale)
    logits = net(normalise(image[None], size))
    return logits_to_labels(logits, size, (height, width))[0]


def tta_size(height: int, width: int, ratio: float) -> tuple[int, int]:
    """mmcv Resize(scale_factor=ratio, keep_ratio=True): scale = round(size * ratio), then imrescale."""
    scale = (int(width * ratio + 0.5), int(height * ratio + 0.5))
    return test_size(height, width, scale)


def predict_multi_scale(
    net: torch.nn.Module, image: torch.Tensor, ratios: Sequence[float] = TTA_RATIOS, flip: bool = True
) -> torch.Tensor:
    height, width = image.shape[:2]
    probs = None
    passes = 0
    for ratio in ratios:
        size = tta_size(height, width, ratio)
        x = normalise(image[None], size)
        for flipped in (False, True) if flip else (False,):
            logits = net(x.flip(3) if flipped else x).float()
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            if flipped:
                logits = logits.flip(3)
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            p = logits.softmax(dim=1)
            probs = p if probs is None else probs + p
            passes += 1
    return (probs / passes).argmax(dim=1)[0]


def evaluate(
    net: torch.nn.Module,
    info: DatasetInfo,
    device: torch.device,
    *,
    scale: tuple[int, int] = TEST_SCALE,
    aug_test: bool = False,
    ratios: Sequence[float] = TTA_RATIOS,
    flip: bool = True,
    env: DistEnv | None = None,
    workers: int = 2,
    show_progress: bool = True,
) -> dict:
    """Metrics of `net` (any mode; evaluated in eval mode) on every sample of `info`.

    With `env` distributed, rank r evaluates samples r, r+W, ... and the areas are summed.
    """
    rank, world = (env.rank, env.world_size) if env else (0, 1)
    dataset = EvalDataset(info, range(rank, len(info.samples), world))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda"
    )
    metric = IoUMetric(info.num_classes, device=device)
    was_training = net.training
    net.eval()
    bar = tqdm(total=len(dataset), desc="evaluating", disable=not (show_progress and rank == 0), dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for image, label in loader:
                image = image.to(device, non_blocking=True)
                if aug_test:
                    pred = predict_multi_scale(net, image, ratios, flip)
                else:
                    pred = predict_single_scale(net, image, scale)
                metric.update(pred, label.to(device, non_blocking=True))
                bar.update()
    finally:
        bar.close()
        net.train(was_training)
    metric.all_reduce()
    return metric.compute()


def load_model(checkpoint: str, arch: str | None, device: torch.device) -> tuple[torch.nn.Module, dict, str]:
    """A network for a checkpoint path, URL or zoo name; returns (net, meta, source)."""
    source = ZOO[checkpoint].url if checkpoint in ZOO else checkpoint
    state, meta = read_state_dict(source)
    arch = arch or meta.get("arch") or (ZOO[checkpoint].arch if checkpoint in ZOO else infer_arch(state))
    net = build_model(arch, num_classes=num_classes_of(state), aux_heads=False)
    load_checkpoint(net, source)
    return net.to(device).eval(), meta, source


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bisenet evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="checkpoint path, URL, or a zoo name (" + ", ".join(ZOO) + ")")
    parser.add_argument("--data", required=True, help="dataset folder (Cityscapes or custom layout)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--classes", help="class file for custom data (default ROOT/classes.json)")
    parser.add_argument("--arch", choices=["bisenetv1_r18", "bisenetv1_r50"], help="default: from the checkpoint")
    parser.add_argument("--aug-test", action="store_true", help="multi-scale + flip (the ms+flip column)")
    parser.add_argument("--ratios", default=",".join(str(r) for r in TTA_RATIOS), help="--aug-test scale ratios")
    parser.add_argument("--no-flip", action="store_true", help="--aug-test without the flipped passes")
    parser.add_argument("--test-scale", default="2048x1024", metavar="LONGxSHORT", help="single-scale resize scale")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    env = init_distributed(args.device)
    try:
        info = open_dataset(args.data, args.split, args.classes)
        net, _, source = load_model(args.checkpoint, args.arch, env.device)
        if net.num_classes != info.num_classes:
            raise DatasetError(
                f"the checkpoint predicts {net.num_classes} classes but {info.root} has {info.num_classes}"
            )
        ratios = tuple(float(r) for r in args.ratios.split(","))
        start = time.perf_counter()
        metrics = evaluate(
            net,
            info,
            env.device,
            scale=size_pair(args.test_scale),
            aug_test=args.aug_test,
            ratios=ratios,
            flip=not args.no_flip,
            env=env,
            workers=args.workers,
        )
    except (DatasetError, CheckpointError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    if env.is_main:
        mode = f"multi-scale {ratios}{' + flip' if not args.no_flip else ''}" if args.aug_test else "single scale"
        print(
            f"{source} on {info.root} ({info.split}, {len(info.samples)} images), {mode}, "
            f"{time.perf_counter() - start:.1f}s"
        )
        print(format_table(info.classes, metrics))
        if args.json_out:
            record = {"checkpoint": source, "split": info.split, "mode": mode, "classes": list(info.classes), **metrics}
            with open(args.json_out, "w") as fh:
                json.dump(_nan_to_none(record), fh, indent=1)  # strict JSON: NaN becomes null
    return 0
