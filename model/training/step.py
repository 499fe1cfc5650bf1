"""The pieces of one training step as mmsegmentation computes them: the per-head losses, the
batch normalisation with padding, per-iteration seeds, and where SyncBN goes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..transforms import mean_std
from .data import IGNORE_INDEX

LOSS_NAMES = ("decode.loss_ce", "aux_0.loss_ce", "aux_1.loss_ce")


def segmentation_losses(outputs, label: torch.Tensor, aux_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """mmseg's CrossEntropyLoss per head: logits upsampled bilinearly to the label size, ignore 255,
    and the mean over ALL label pixels (avg_non_ignore=False: ignored pixels count as zero loss)."""
    losses = {}
    for name, logits, weight in zip(LOSS_NAMES, outputs, (1.0, aux_weight, aux_weight)):
        logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
        per_pixel = F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX, reduction="none")
        losses[name] = per_pixel.mean() * weight
    return losses


def normalise_batch(images: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) RGB -> normalised float; the padding becomes 0 as mmseg pads after normalising."""
    mean, std = mean_std(images.device)
    x = (images.float() - mean) / std
    for i, (h, w) in enumerate(valid.tolist()):
        x[i, :, h:, :] = 0
        x[i, :, :, w:] = 0
    return x


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1)[0])


def apply_sync_bn(net: nn.Module) -> None:
    """SyncBN where mmseg uses it: the ResNet and the heads. ContextPath/SpatialPath/FFM are built
    without norm_cfg in mmseg and keep plain BN (docs/model.md, "Training recipe")."""
    cp = net.backbone.context_path
    cp.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(cp.backbone)
    net.decode_head = nn.SyncBatchNorm.convert_sync_batchnorm(net.decode_head)
    if net.auxiliary_head is not None:
        net.auxiliary_head = nn.SyncBatchNorm.convert_sync_batchnorm(net.auxiliary_head)
