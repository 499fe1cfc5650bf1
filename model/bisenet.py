"""BiSeNetV1 exactly as mmsegmentation builds it (docs/model.md: network, keys and forward pass).

Module names mirror mmsegmentation so `state_dict()` keys are the official ones:
`backbone.{context_path,spatial_path,ffm}.*`, `decode_head.*`, `auxiliary_head.{0,1}.*`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import ResNet


class ConvModule(nn.Module):
    """mmcv ConvModule: bias-free conv, then `bn`, then an optional ReLU named `activate`."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
        self.activate = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class SpatialPath(nn.Module):
    def __init__(self, channels: tuple[int, int, int, int]):
        super().__init__()
        s0, s1, s2, s3 = channels
        self.layer1 = ConvModule(3, s0, 7, 2, 3)
        self.layer2 = ConvModule(s0, s1, 3, 2, 1)
        self.layer3 = ConvModule(s1, s2, 3, 2, 1)
        self.layer4 = ConvModule(s2, s3, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class AttentionRefinementModule(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv_layer = ConvModule(cin, cout, 3, 1, 1)
        self.atten_conv_layer = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), ConvModule(cout, cout, 1, act=False), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv_layer(x)
        return f * self.atten_conv_layer(f)


class ContextPath(nn.Module):
    def __init__(self, depth: int, channels: tuple[int, int, int]):
        super().__init__()
        c0, c1, c2 = channels
        self.backbone = ResNet(depth)
        self.arm16 = AttentionRefinementModule(c1, c0)
        self.arm32 = AttentionRefinementModule(c2, c0)
        self.conv_head32 = ConvModule(c0, c0, 3, 1, 1)
        self.conv_head16 = ConvModule(c0, c0, 3, 1, 1)
        self.gap_conv = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(c2, c0, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, x_8, x_16, x_32 = self.backbone(x)
        x_32_sum = self.arm32(x_32) + self.gap_conv(x_32)
        # Legacy 'nearest' with an explicit size, as mmseg's resize(): right for odd shapes too.
        x_32_up = self.conv_head32(F.interpolate(x_32_sum, size=x_16.shape[2:], mode="nearest"))
        x_16_sum = self.arm16(x_16) + x_32_up
        x_16_up = self.conv_head16(F.interpolate(x_16_sum, size=x_8.shape[2:], mode="nearest"))
        return x_16_up, x_32_up


class FeatureFusionModule(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = ConvModule(cin, cout, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        # mmseg keeps a ReLU before the sigmoid here (unlike the paper and CoinCheung's code).
        self.conv_atten = nn.Sequential(ConvModule(cout, cout, 1), nn.Sigmoid())

    def forward(self, x_sp: torch.Tensor, x_cp: torch.Tensor) -> torch.Tensor:
        f = self.conv1(torch.cat([x_sp, x_cp], dim=1))
        return f * self.conv_atten(self.gap(f)) + f


class BiSeNetV1Backbone(nn.Module):
    def __init__(self, spec: "BiSeNetSpec"):
        super().__init__()
        self.context_path = ContextPath(spec.depth, spec.context_channels)
        self.spatial_path = SpatialPath(spec.spatial_channels)
        self.ffm = FeatureFusionModule(spec.context_channels[0] + spec.spatial_channels[3], spec.out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_context8, x_context16 = self.context_path(x)
        x_spatial = self.spatial_path(x)
        return self.ffm(x_spatial, x_context8), x_context8, x_context16


class FCNHead(nn.Module):
    """mmseg FCNHead with num_convs=1, concat_input=False, dropout 0.1."""

    def __init__(self, cin: int, channels: int, num_classes: int):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(cin, channels, 3, 1, 1))
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


@dataclass(frozen=True)
class BiSeNetSpec:
    depth: int
    context_channels: tuple[int, int, int]
    spatial_channels: tuple[int, int, int, int]
    out_channels: int
    head_channels: int
    aux_in_channels: int
    aux_channels: int


SPECS = {
    "bisenetv1_r18": BiSeNetSpec(18, (128, 256, 512), (64, 64, 64, 128), 256, 256, 128, 64),
    "bisenetv1_r50": BiSeNetSpec(50, (512, 1024, 2048), (256, 256, 256, 512), 1024, 1024, 512, 256),
}


class BiSeNetV1(nn.Module):
    """Backbone + FCN decode head (+ two auxiliary FCN heads for training).

    eval: `net(x)` returns decode logits (N, C, ceil(H/8), ceil(W/8)).
    train: returns (decode, aux0, aux1), or (decode,) without auxiliary heads.
    """

    def __init__(self, spec: BiSeNetSpec, num_classes: int = 19, aux_heads: bool = True):
        super().__init__()
        self.spec = spec
        self.num_classes = num_classes
        self.backbone = BiSeNetV1Backbone(spec)
        self.decode_head = FCNHead(spec.out_channels, spec.head_channels, num_classes)
        self.auxiliary_head = (
            nn.ModuleList([FCNHead(spec.aux_in_channels, spec.aux_channels, num_classes) for _ in range(2)])
            if aux_heads
            else None
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        heads = [self.decode_head, *(self.auxiliary_head or [])]
        for head in heads:
            nn.init.normal_(head.conv_seg.weight, std=0.01)
            nn.init.zeros_(head.conv_seg.bias)

    def forward(self, x: torch.Tensor):
        feats = self.backbone(x)
        decode = self.decode_head(feats[0])
        if not self.training:
            return decode
        if self.auxiliary_head is None:
            return (decode,)
        return decode, self.auxiliary_head[0](feats[1]), self.auxiliary_head[1](feats[2])


def build_model(name: str, num_classes: int = 19, aux_heads: bool = True) -> BiSeNetV1:
    """Build `bisenetv1_r18` or `bisenetv1_r50` (a zoo checkpoint name also works)."""
    from .zoo import resolve_arch

    return BiSeNetV1(SPECS[resolve_arch(name)], num_classes=num_classes, aux_heads=aux_heads)
