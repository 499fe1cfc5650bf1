"""The network: mmsegmentation's state_dict layout, output shapes, test-time resize arithmetic.

Expected keys, shapes and counts are the ones read off mmsegmentation 1.2.2 models built on the CPU
(the table in docs/model.md), written out here rather than derived from our code.
"""

from __future__ import annotations

import pytest
import torch

from model import build_model, transforms

# (key count, BN layer count, params with aux heads, params without), as mmsegmentation 1.2.2 builds them.
COUNTS = {"bisenetv1_r18": (222, 36, 13_425_721, 13_275_539), "bisenetv1_r50": (420, 69, 59_243_385, 56_873_299)}

R18_SHAPES = {
    "backbone.context_path.backbone.conv1.weight": (64, 3, 7, 7),
    "backbone.context_path.backbone.bn1.running_var": (64,),
    "backbone.context_path.backbone.layer1.0.conv1.weight": (64, 64, 3, 3),
    "backbone.context_path.backbone.layer2.0.conv1.weight": (128, 64, 3, 3),
    "backbone.context_path.backbone.layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "backbone.context_path.backbone.layer4.1.bn2.weight": (512,),
    "backbone.context_path.arm16.conv_layer.conv.weight": (128, 256, 3, 3),
    "backbone.context_path.arm32.conv_layer.conv.weight": (128, 512, 3, 3),
    "backbone.context_path.arm32.atten_conv_layer.1.conv.weight": (128, 128, 1, 1),
    "backbone.context_path.arm32.atten_conv_layer.1.bn.running_mean": (128,),
    "backbone.context_path.conv_head32.conv.weight": (128, 128, 3, 3),
    "backbone.context_path.conv_head16.conv.weight": (128, 128, 3, 3),
    "backbone.context_path.gap_conv.1.conv.weight": (128, 512, 1, 1),
    "backbone.spatial_path.layer1.conv.weight": (64, 3, 7, 7),
    "backbone.spatial_path.layer3.conv.weight": (64, 64, 3, 3),
    "backbone.spatial_path.layer4.conv.weight": (128, 64, 1, 1),
    "backbone.ffm.conv1.conv.weight": (256, 256, 1, 1),
    "backbone.ffm.conv_atten.0.conv.weight": (256, 256, 1, 1),
    "backbone.ffm.conv_atten.0.bn.num_batches_tracked": (),
    "decode_head.convs.0.conv.weight": (256, 256, 3, 3),
    "decode_head.conv_seg.weight": (19, 256, 1, 1),
    "decode_head.conv_seg.bias": (19,),
    "auxiliary_head.0.convs.0.conv.weight": (64, 128, 3, 3),
    "auxiliary_head.1.conv_seg.weight": (19, 64, 1, 1),
}

R50_SHAPES = {
    "backbone.context_path.backbone.conv1.weight": (64, 3, 7, 7),
    "backbone.context_path.backbone.layer1.0.conv1.weight": (64, 64, 1, 1),
    "backbone.context_path.backbone.layer1.0.conv3.weight": (256, 64, 1, 1),
    "backbone.context_path.backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "backbone.context_path.backbone.layer2.0.conv2.weight": (128, 128, 3, 3),
    "backbone.context_path.backbone.layer3.5.conv3.weight": (1024, 256, 1, 1),
    "backbone.context_path.backbone.layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
    "backbone.context_path.backbone.layer4.2.bn3.running_var": (2048,),
    "backbone.context_path.arm16.conv_layer.conv.weight": (512, 1024, 3, 3),
    "backbone.context_path.arm32.conv_layer.conv.weight": (512, 2048, 3, 3),
    "backbone.context_path.gap_conv.1.conv.weight": (512, 2048, 1, 1),
    "backbone.spatial_path.layer1.conv.weight": (256, 3, 7, 7),
    "backbone.spatial_path.layer4.conv.weight": (512, 256, 1, 1),
    "backbone.ffm.conv1.conv.weight": (1024, 1024, 1, 1),
    "backbone.ffm.conv_atten.0.conv.weight": (1024, 1024, 1, 1),
    "decode_head.convs.0.conv.weight": (1024, 1024, 3, 3),
    "decode_head.conv_seg.weight": (19, 1024, 1, 1),
    "auxiliary_head.0.convs.0.conv.weight": (256, 512, 3, 3),
    "auxiliary_head.1.conv_seg.weight": (19, 256, 1, 1),
}


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return build_model("bisenetv1_r18").eval()


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return build_model("bisenetv1_r50").eval()


@pytest.mark.parametrize("name", ["bisenetv1_r18", "bisenetv1_r50"])
def test_state_dict_counts(name, r18, r50):
    net = r18 if name.endswith("r18") else r50
    keys, bn_layers, params, params_no_aux = COUNTS[name]
    state = net.state_dict()
    assert len(state) == keys
    assert sum(k.endswith(".running_mean") for k in state) == bn_layers
    assert sum(p.numel() for p in net.parameters()) == params
    with torch.device("meta"):  # shapes only: no memory, no init time
        assert sum(p.numel() for p in build_model(name, aux_heads=False).parameters()) == params_no_aux
    # No `data_preprocessor.*` buffers and no `stem.*` (deep stem) keys in mmseg's files.
    assert not any(k.startswith("data_preprocessor") or ".stem." in k for k in state)


@pytest.mark.parametrize("name", ["bisenetv1_r18", "bisenetv1_r50"])
def test_state_dict_shapes_match_reference(name, r18, r50):
    state = (r18 if name.endswith("r18") else r50).state_dict()
    expected = R18_SHAPES if name.endswith("r18") else R50_SHAPES
    wrong = {k: tuple(state[k].shape) for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape}
    missing = [k for k in expected if k not in state]
    assert not missing and not wrong, (missing, wrong)


def test_bn_and_bias_conventions(r18):
    state = r18.state_dict()
    tracked = state["backbone.spatial_path.layer2.bn.num_batches_tracked"]
    assert tracked.dtype == torch.int64 and tracked.shape == ()
    # ConvModule(bias='auto') drops the conv bias before a norm: only conv_seg has one.
    biases = [k for k in state if k.endswith(".bias") and ".bn" not in k and "downsample.1" not in k]
    assert all(k.endswith("conv_seg.bias") for k in biases), biases
    bn_eps = {m.eps for m in r18.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert bn_eps == {1e-5}
    # Only layer2-4 of the ResNet-18 have a downsample branch.
    down = sorted({k.split(".downsample")[0].rsplit(".", 2)[-2] for k in state if ".downsample." in k})
    assert down == ["layer2", "layer3", "layer4"]


@pytest.mark.parametrize("height,width,out", [(64, 128, (8, 16)), (95, 27, (12, 4)), (33, 65, (5, 9))])
def test_eval_output_shape(r18, height, width, out):
    with torch.inference_mode():
        logits = r18(torch.randn(1, 3, height, width))
    assert logits.shape == (1, 19, *out)
    assert torch.isfinite(logits).all()


def test_r50_output_shape(r50):
    with torch.inference_mode():
        assert r50(torch.randn(1, 3, 64, 96)).shape == (1, 19, 8, 12)


def test_train_mode_returns_decode_and_aux_heads():
    torch.manual_seed(0)
    net = build_model("bisenetv1_r18", num_classes=7).train()
    # Batch 2: the GAP branch's BN needs more than one value per channel in training.
    outs = net(torch.randn(2, 3, 95, 27))
    assert isinstance(outs, tuple) and len(outs) == 3
    # decode and aux0 read stride-8 features, aux1 the stride-16 context feature.
    assert [tuple(o.shape) for o in outs] == [(2, 7, 12, 4), (2, 7, 12, 4), (2, 7, 6, 2)]
    outs[0].mean().backward()
    assert net.backbone.spatial_path.layer1.conv.weight.grad is not None


def test_train_mode_without_aux_heads():
    net = build_model("bisenetv1_r18", aux_heads=False).train()
    outs = net(torch.randn(2, 3, 64, 64))
    assert isinstance(outs, tuple) and len(outs) == 1 and outs[0].shape == (2, 19, 8, 8)
    assert not any(k.startswith("auxiliary_head") for k in net.state_dict())


def test_build_model_names():
    assert build_model("bisenetv1_r18_4x4_scratch", aux_heads=False).spec.depth == 18
    with pytest.raises(KeyError, match="unknown model"):
        build_model("bisenetv2")


@pytest.mark.parametrize(
    "width,height,expected",
    [
        (741, 500, (1518, 1024)),  # docs/model.md's worked example: enlarged
        (512, 512, (1024, 1024)),
        (2048, 1024, (2048, 1024)),  # a Cityscapes frame stays as it is
        (4096, 2048, (2048, 1024)),  # shrunk
        (1024, 2048, (1024, 2048)),  # portrait: the long edge is capped at 2048
    ],
)
def test_test_size_reference_examples(width, height, expected):
    new_h, new_w = transforms.test_size(height, width)
    assert (new_w, new_h) == expected


def test_resize_uint8_hand_computed():
    # One row 0, 255 widened to 4 (OpenCV INTER_LINEAR, 11-bit weights), worked by hand:
    # x=0 sits left of the first centre (edge pixel), x=1 -> 0.25 of the way = 63.75 -> 64,
    # x=2 -> 0.75 -> 191.25 -> 191, x=3 past the last centre (edge pixel).
    image = torch.tensor([[[0, 0, 0], [255, 255, 255]]], dtype=torch.uint8)[None]
    out = transforms.resize_uint8(image, (1, 4))
    assert out[0, 0, :, 0].tolist() == [0, 64, 191, 255]
    # A flat image stays flat whatever the scale, and same-size is the identity.
    flat = torch.full((2, 5, 7, 3), 77, dtype=torch.uint8)
    assert (transforms.resize_uint8(flat, (13, 3)) == 77).all()
    noise = torch.randint(0, 256, (1, 9, 11, 3), dtype=torch.uint8)
    assert torch.equal(transforms.resize_uint8(noise, (9, 11)), noise)
    # Halving averages 2x2 blocks with round-half-up: (1 + 2 + 3 + 4 + 2) >> 2 = 3.
    block = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8).view(1, 2, 2, 1)
    assert transforms.resize_uint8(block, (1, 1)).item() == 3
