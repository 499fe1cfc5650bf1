"""ONNX export: `bisenet export --model bisenetv1_r18 --output model.onnx`.

The graph is the network alone, with BatchNorm folded into the convolutions:

  input   `image`   float32 (N, 3, H, W): RGB, already resized to H x W and normalised with
                    mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375) on 0-255
  output  `logits`  float32 (N, C, ceil(H/8), ceil(W/8)): the decode head's logits (default), or
          `labels`  uint8 (N, H, W) with `--outputs labels`: logits resized bilinearly
                    (align_corners=False) to H x W, then argmax.

Why logits by default: they are what mmsegmentation's decode head returns, so the file can be
checked against it; they are 64x smaller than full-size scores; and the caller's own resize back
to the original image size (mmseg resizes logits twice) stays possible. `--outputs labels` is for
runtimes that want one ready mask at the network size (ArgMax is a standard ONNX op, no plugin).
Resizing the photo to the test size and back stays outside the graph, as in mmdeploy.

N is dynamic; H and W are fixed at export (`--height/--width`, default 1024x2048, the Cityscapes
frame). The normalisation constants, class names and sizes are stored in the model's
metadata_props.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .bisenet import build_model
from .checkpoint import load_checkpoint
from .predictor import class_info, resolve_weights
from .runtime import fold_batchnorm
from .transforms import MEAN, STD
from .zoo import resolve_arch

OUTPUTS = ("logits", "labels")


class LabelsHead(nn.Module):
    """Network + bilinear resize to the input size + argmax, as one exportable module."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(self.net(image), size=image.shape[2:], mode="bilinear", align_corners=False)
        return logits.argmax(dim=1).to(torch.uint8)


def export_onnx(
    net: nn.Module,
    output: str | Path,
    height: int = 1024,
    width: int = 2048,
    outputs: str = "logits",
    opset: int = 18,
    metadata: dict | None = None,
) -> Path:
    """Write `net` (eval, BN folded here) as ONNX with a dynamic batch dimension; returns the path."""
    if outputs not in OUTPUTS:
        raise ValueError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")
    module = fold_batchnorm(net)
    if outputs == "labels":
        module = LabelsHead(module).eval()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Batch 2 as the example: a batch of 1 lets torch.export specialise the dimension to a constant.
    example = torch.zeros(2, 3, height, width)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        module,
        (example,),
        input_names=["image"],
        output_names=[outputs],
        opset_version=opset,
        dynamo=True,
        dynamic_shapes=({0: batch},),
        external_data=False,
        verbose=False,
    )
    import onnx

    model = program.model_proto
    meta = {
        "mean": json.dumps(MEAN),
        "std": json.dumps(STD),
        "input_size": json.dumps([height, width]),
        "outputs": outputs,
        "layout": "NCHW RGB float32, normalised",
        **(metadata or {}),
    }
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(model, output)
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bisenet export",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="bisenetv1_r18", help="bisenetv1_r18, bisenetv1_r50 or a zoo entry name")
    parser.add_argument(
        "--weights", default=None, help="zoo entry, path, http(s) URL or 'random' (default: the model's zoo checkpoint)"
    )
    parser.add_argument("--output", required=True, type=Path, help="where to write the .onnx file")
    parser.add_argument("--height", type=int, default=1024, help="input height fixed in the graph (default 1024)")
    parser.add_argument("--width", type=int, default=2048, help="input width fixed in the graph (default 2048)")
    parser.add_argument(
        "--outputs",
        choices=OUTPUTS,
        default="logits",
        help="logits: (N, C, H/8, W/8) float32 (default); labels: (N, H, W) uint8 argmax",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--num-classes", type=int, default=None, help="class count when it is not 19")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    arch = resolve_arch(args.model)
    source = resolve_weights(args.model, args.weights)
    num_classes = args.num_classes or 19
    net = build_model(arch, num_classes=num_classes, aux_heads=False).eval()
    meta = load_checkpoint(net, source) if source is not None else {}
    classes, _ = class_info(meta, num_classes)
    path = export_onnx(
        net,
        args.output,
        args.height,
        args.width,
        args.outputs,
        args.opset,
        {"arch": arch, "weights": source or "random", "classes": json.dumps(classes)},
    )
    print(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {arch}, input image (N, 3, {args.height}, "
        f"{args.width}) float32, output {args.outputs}"
    )
    return 0
