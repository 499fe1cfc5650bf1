"""Named configurations: the mmsegmentation Cityscapes checkpoints, classes and palette."""

from __future__ import annotations

from dataclasses import dataclass

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

CITYSCAPES_PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

OFFICIAL_BASE = "https://download.openmmlab.com/mmsegmentation/v0.5/bisenetv1"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    arch: str
    config: str
    filename: str
    miou: float
    miou_ms_flip: float
    description: str

    @property
    def url(self) -> str:
        return f"{OFFICIAL_BASE}/{self.config}/{self.filename}"


def _entry(name, arch, config, stamp, miou, msf, description):
    return ZooEntry(name, arch, config, f"{config}_{stamp}.pth", miou, msf, description)


ZOO = {
    e.name: e
    for e in (
        _entry(
            "bisenetv1_r18_4x4_scratch",
            "bisenetv1_r18",
            "bisenetv1_r18-d32_4x4_1024x1024_160k_cityscapes",
            "20210922_172239-c55e78e2",
            74.44,
            77.05,
            "R-18-D32, trained from scratch, 4x4",
        ),
        _entry(
            "bisenetv1_r18_4x4_in1k",
            "bisenetv1_r18",
            "bisenetv1_r18-d32_in1k-pre_4x4_1024x1024_160k_cityscapes",
            "20210905_220251-8ba80eff",
            74.37,
            76.91,
            "R-18-D32, ImageNet-initialised, 4x4",
        ),
        _entry(
            "bisenetv1_r18_4x8_in1k",
            "bisenetv1_r18",
            "bisenetv1_r18-d32_in1k-pre_4x8_1024x1024_160k_cityscapes",
            "20210905_220322-bb8db75f",
            75.16,
            77.24,
            "R-18-D32, ImageNet-initialised, 4x8",
        ),
        _entry(
            "bisenetv1_r50_4x4_scratch",
            "bisenetv1_r50",
            "bisenetv1_r50-d32_4x4_1024x1024_160k_cityscapes",
            "20210923_222639-7b28a2a6",
            76.92,
            78.87,
            "R-50-D32, trained from scratch, 4x4",
        ),
        _entry(
            "bisenetv1_r50_4x4_in1k",
            "bisenetv1_r50",
            "bisenetv1_r50-d32_in1k-pre_4x4_1024x1024_160k_cityscapes",
            "20210917_234628-8b304447",
            77.68,
            79.57,
            "R-50-D32, ImageNet-initialised, 4x4",
        ),
    )
}

# The architecture names default to the best row of the table for each backbone.
DEFAULT_WEIGHTS = {"bisenetv1_r18": "bisenetv1_r18_4x8_in1k", "bisenetv1_r50": "bisenetv1_r50_4x4_in1k"}
ARCHS = tuple(DEFAULT_WEIGHTS)


def resolve_arch(name: str) -> str:
    """Architecture (`bisenetv1_r18`/`bisenetv1_r50`) of an architecture or zoo name."""
    if name in DEFAULT_WEIGHTS:
        return name
    if name in ZOO:
        return ZOO[name].arch
    raise KeyError(f"unknown model {name!r}; known: {', '.join(list(DEFAULT_WEIGHTS) + list(ZOO))}")


def default_entry(name: str) -> ZooEntry:
    """The zoo entry used when only a name is given (the best row for an architecture)."""
    resolve_arch(name)  # raises a clear KeyError for unknown names
    return ZOO[DEFAULT_WEIGHTS.get(name, name)]
