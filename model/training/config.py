"""Training settings: the five presets of mmsegmentation's BiSeNetV1 Cityscapes table, and the
command line that overrides any of them."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

from ..zoo import ZOO
from .schedule import STYLES

# torchvision's ImageNet ResNet weights (the file names carry their sha256 prefix, which the
# downloader checks). mmseg's "in1k-pre" configs use open-mmlab://resnet{18,50}_v1c instead.
TORCHVISION_RESNET = {
    "bisenetv1_r18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "bisenetv1_r50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}


@dataclass
class TrainConfig:
    preset: str = "bisenetv1_r18_cityscapes"
    arch: str = "bisenetv1_r18"
    # data
    data: str = "data/cityscapes"
    classes: str | None = None  # class file for custom data (default ROOT/classes.json)
    train_split: str = "train"
    val_split: str = "val"
    check_labels: bool = True  # read every label before the first step
    # augmentation (docs/model.md, "Training recipe")
    crop: tuple[int, int] = (1024, 1024)  # height, width
    scale: tuple[int, int] = (2048, 1024)  # RandomResize scale (long, short edge)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    test_scale: tuple[int, int] = (2048, 1024)
    # optimisation
    iters: int = 160_000
    batch_size: int = 4  # per process
    lr: float = 0.025
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "mmcv"
    warmup_iters: int = 1000
    warmup_ratio: float = 0.1
    power: float = 0.9
    min_lr: float = 1e-4
    aux_weight: float = 1.0
    # initialisation
    backbone_weights: str | None = None
    load_from: str | None = None
    resume: str | None = None  # a checkpoint path, or "auto" for the work dir's latest
    # run
    work_dir: str | None = None  # default work_dirs/PRESET
    val_interval: int = 16_000  # 0 disables validation
    ckpt_interval: int = 16_000
    log_interval: int = 50
    max_keep_ckpts: int = 0  # 0 keeps all
    device: str = "auto"
    amp: str = "none"
    workers: int = 4  # DataLoader workers per process
    seed: int = 0
    sync_bn: str = "auto"  # auto: on when distributed on CUDA
    cudnn_benchmark: bool = True
    deterministic: bool = False
    channels_last: bool = False
    tensorboard: bool = True
    # for the record: the recipe's GPU count and the table's numbers for this row
    recipe_gpus: int = 4
    reference: dict = field(default_factory=dict)

    def resolved_work_dir(self) -> str:
        return self.work_dir or f"work_dirs/{self.preset}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)


def _preset(name: str, arch: str, zoo_name: str, *, batch_size: int = 4, in1k: bool = False) -> TrainConfig:
    entry = ZOO[zoo_name]
    return TrainConfig(
        preset=name,
        arch=arch,
        batch_size=batch_size,
        lr=0.05 if arch == "bisenetv1_r50" else 0.025,
        backbone_weights=TORCHVISION_RESNET[arch] if in1k else None,
        reference={"zoo": zoo_name, "mIoU": entry.miou, "mIoU_ms_flip": entry.miou_ms_flip, "config": entry.config},
    )


PRESETS = {
    p.preset: p
    for p in (
        _preset("bisenetv1_r18_cityscapes", "bisenetv1_r18", "bisenetv1_r18_4x4_scratch"),
        _preset("bisenetv1_r18_in1k_cityscapes", "bisenetv1_r18", "bisenetv1_r18_4x4_in1k", in1k=True),
        _preset(
            "bisenetv1_r18_in1k_4x8_cityscapes", "bisenetv1_r18", "bisenetv1_r18_4x8_in1k", batch_size=8, in1k=True
        ),
        _preset("bisenetv1_r50_cityscapes", "bisenetv1_r50", "bisenetv1_r50_4x4_scratch", batch_size=4),
        _preset("bisenetv1_r50_in1k_cityscapes", "bisenetv1_r50", "bisenetv1_r50_4x4_in1k", in1k=True),
    )
}


def presets_help() -> str:
    lines = ["presets (mmsegmentation's BiSeNetV1 Cityscapes table; 160k iterations, crop 1024x1024, 4 GPUs):"]
    for name, p in PRESETS.items():
        init = "ImageNet (torchvision) backbone" if p.backbone_weights else "from scratch"
        lines.append(
            f"  {name:<36} {p.arch[-3:].upper()}, {init}, batch {p.batch_size}/GPU x 4, lr {p.lr}, "
            f"table mIoU {p.reference['mIoU']} / ms+flip {p.reference['mIoU_ms_flip']}"
        )
    return "\n".join(lines)


# -- parsing helpers ---------------------------------------------------------------------------
def size_pair(text: str) -> tuple[int, int]:
    """'1024x512' -> (1024, 512); a single number gives a square."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected AxB with integers, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected two positive integers AxB, got {text!r}")
    return values  # type: ignore[return-value]


def float_pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return low, high


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bisenet train",
        description="Train BiSeNetV1 with mmsegmentation's Cityscapes recipe (one process, or torchrun for many GPUs). "
        "Every setting comes from --preset and can be overridden by its flag.",
        epilog=presets_help() + "\n\nSee docs/training.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = parser.add_argument
    a("--preset", choices=list(PRESETS), default="bisenetv1_r18_cityscapes", help="starting settings (see below)")
    a("--arch", choices=["bisenetv1_r18", "bisenetv1_r50"], help="network")
    g = parser.add_argument_group("data")
    g.add_argument("--data", help="dataset folder: Cityscapes layout or images/ + masks/ + classes.json")
    g.add_argument("--classes", help="class file (JSON, or YAML with PyYAML) for custom data")
    g.add_argument("--train-split", help="split to train on (default train)")
    g.add_argument("--val-split", help="split to validate on (default val)")
    g.add_argument(
        "--skip-label-check",
        dest="check_labels",
        action="store_false",
        default=None,
        help="do not read every label before training (bad values then fail when met)",
    )
    g.add_argument("--crop", type=size_pair, metavar="HxW", help="training crop (default 1024x1024)")
    g.add_argument("--scale", type=size_pair, metavar="LONGxSHORT", help="RandomResize scale (default 2048x1024)")
    g.add_argument("--ratio-range", type=float_pair, metavar="LOW,HIGH", help="RandomResize ratios (default 0.5,2.0)")
    g.add_argument("--cat-max-ratio", type=float, help="RandomCrop cat_max_ratio (default 0.75; 1 disables)")
    g.add_argument("--flip-prob", type=float, help="horizontal flip probability (default 0.5)")
    g.add_argument(
        "--no-photometric", dest="photometric", action="store_false", default=None, help="skip PhotoMetricDistortion"
    )
    g.add_argument(
        "--test-scale", type=size_pair, metavar="LONGxSHORT", help="validation resize scale (default 2048x1024)"
    )
    g.add_argument("--workers", type=int, help="DataLoader worker processes per training process (default 4)")
    o = parser.add_argument_group("optimisation")
    o.add_argument("--iters", type=int, help="training iterations (default 160000)")
    o.add_argument("--batch-size", type=int, help="images per process and iteration (preset: 4 or 8)")
    o.add_argument("--lr", type=float, help="base learning rate (R18 0.025, R50 0.05)")
    o.add_argument("--momentum", type=float)
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--schedule", choices=STYLES, help="lr schedule: mmcv = 0.x poly+warmup (default), mmengine = 1.x")
    o.add_argument("--warmup-iters", type=int, help="linear warm-up iterations (default 1000)")
    o.add_argument("--warmup-ratio", type=float, help="warm-up start factor (default 0.1)")
    o.add_argument("--power", type=float, help="poly power (default 0.9)")
    o.add_argument("--min-lr", type=float, help="final learning rate (default 1e-4)")
    o.add_argument("--aux-weight", type=float, help="loss weight of each auxiliary head (default 1)")
    o.add_argument("--amp", choices=["none", "bf16", "fp16"], help="mixed precision (fp16 uses a dynamic loss scale)")
    o.add_argument(
        "--sync-bn", choices=["auto", "on", "off"], help="SyncBN in ResNet and heads (auto: distributed CUDA)"
    )
    i = parser.add_argument_group("initialisation and resuming")
    i.add_argument("--backbone-weights", help="torchvision-format ImageNet ResNet (path or URL); 'none' for scratch")
    i.add_argument(
        "--load-from",
        help="start from a model's weights: path, URL or zoo name (fine-tuning; other class counts are fine)",
    )
    i.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        help="continue a run: a checkpoint path, or no value for the work dir's latest",
    )
    r = parser.add_argument_group("run")
    r.add_argument("--work-dir", help="checkpoints and logs (default work_dirs/PRESET)")
    r.add_argument("--val-interval", type=int, help="validate every N iterations (0: never; default 16000)")
    r.add_argument("--ckpt-interval", type=int, help="checkpoint every N iterations (default 16000)")
    r.add_argument("--log-interval", type=int, help="log every N iterations (default 50)")
    r.add_argument("--max-keep-ckpts", type=int, help="keep only the newest N iteration checkpoints (0: all)")
    r.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    r.add_argument("--seed", type=int)
    r.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false", default=None)
    r.add_argument("--deterministic", action="store_true", default=None, help="deterministic algorithms (slower)")
    r.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory format")
    r.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=None)
    r.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = dataclasses.replace(PRESETS[args.preset])
    cfg.reference = dict(cfg.reference)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name != "preset":
            setattr(cfg, f.name, value)
    if cfg.backbone_weights and cfg.backbone_weights.lower() == "none":
        cfg.backbone_weights = None
    if args.arch and args.arch != PRESETS[args.preset].arch and args.backbone_weights is None:
        cfg.backbone_weights = TORCHVISION_RESNET[cfg.arch] if PRESETS[args.preset].backbone_weights else None
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    checks = [
        (cfg.iters > 0, f"--iters must be positive, got {cfg.iters}"),
        # BiSeNet's global-pool branches end in BatchNorm over 1x1 maps (plain BN in ContextPath
        # even in mmseg), which cannot normalise a single value per channel.
        (
            cfg.batch_size >= 2,
            f"--batch-size must be at least 2 per process (BN after global pooling), got {cfg.batch_size}",
        ),
        (cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
        (cfg.val_interval >= 0 and cfg.ckpt_interval > 0 and cfg.log_interval > 0, "intervals must be positive"),
        (cfg.workers >= 0, "--workers must be 0 or more"),
        (cfg.amp in ("none", "bf16", "fp16"), f"--amp must be none, bf16 or fp16, got {cfg.amp}"),
        (0 < cfg.cat_max_ratio <= 1, "--cat-max-ratio must be in (0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
