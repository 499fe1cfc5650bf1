"""mmsegmentation's IoUMetric: per-class areas summed over the dataset, then aAcc, mIoU and mAcc.

Per class c over all images (pixels labelled 255 are left out):
  intersect = #(pred == label == c)     union = #(pred == c) + #(label == c) - intersect
  IoU = intersect / union               Acc = intersect / #(label == c)
A class absent from both the labels and the predictions has IoU = nan; one absent from the labels
has Acc = nan (and IoU 0 when it was predicted). mIoU and mAcc are nan-means, as mmseg's
`np.nanmean`; aAcc is sum(intersect) / sum(label area). Reported in percent, rounded to 2 places.
Areas are counted in int64 (mmseg sums float32 histograms; the difference is below the rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255):
    """(area_intersect, area_union, area_pred, area_label), each int64 of length num_classes.

    Values outside 0..num_classes-1 are not counted, as mmseg's torch.histc with those bounds.
    """
    mask = label != ignore_index
    pred, label = pred[mask].long(), label[mask].long()

    def count(values: torch.Tensor) -> torch.Tensor:
        values = values[(values >= 0) & (values < num_classes)]
        return torch.bincount(values, minlength=num_classes)[:num_classes]

    area_intersect = count(pred[pred == label])
    area_pred, area_label = count(pred), count(label)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


class IoUMetric:
    """Accumulates areas image by image (on any device); `all_reduce` merges ranks."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: str | torch.device = "cpu"):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.areas = torch.zeros(4, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
        areas = intersect_and_union(
            pred.to(self.areas.device), label.to(self.areas.device), self.num_classes, self.ignore_index
        )
        self.areas += torch.stack(areas)

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.areas)

    def compute(self) -> dict:
        """{'aAcc', 'mIoU', 'mAcc'} in percent plus per-class 'IoU' and 'Acc' lists (nan kept)."""
        return compute_metrics(*self.areas.cpu().numpy())


def compute_metrics(area_intersect, area_union, area_pred, area_label) -> dict:
    intersect = np.asarray(area_intersect, dtype=np.float64)
    union = np.asarray(area_union, dtype=np.float64)
    label = np.asarray(area_label, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union
        acc = intersect / label
        a_acc = intersect.sum() / label.sum() if label.sum() else math.nan

    def nanmean(values: np.ndarray) -> float:
        return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan

    def percent(value) -> float:
        return float(np.round(value * 100, 2))  # np.round, as mmseg rounds

    return {
        "aAcc": percent(a_acc),
        "mIoU": percent(nanmean(iou)),
        "mAcc": percent(nanmean(acc)),
        "IoU": [percent(v) for v in iou],
        "Acc": [percent(v) for v in acc],
    }


def format_table(classes: Sequence[str], metrics: dict) -> str:
    """The per-class table and the summary line, as mmseg prints them."""
    width = max(len("Class"), *(len(c) for c in classes))
    lines = [
        f"+-{'-' * width}-+--------+--------+",
        f"| {'Class':<{width}} |  IoU   |  Acc   |",
        f"+-{'-' * width}-+--------+--------+",
    ]
    for name, iou, acc in zip(classes, metrics["IoU"], metrics["Acc"]):
        lines.append(f"| {name:<{width}} | {iou:6.2f} | {acc:6.2f} |")
    lines.append(lines[0])
    lines.append(f"aAcc: {metrics['aAcc']:.2f}  mIoU: {metrics['mIoU']:.2f}  mAcc: {metrics['mAcc']:.2f}")
    return "\n".join(lines)
