"""BiSeNetV1 for Cityscapes: the network, checkpoints, and fast inference. No serving code here."""

from .bisenet import BiSeNetV1, build_model
from .checkpoint import CheckpointError, load_checkpoint
from .predictor import Segmenter
from .zoo import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, ZOO

__all__ = [
    "BiSeNetV1",
    "build_model",
    "load_checkpoint",
    "CheckpointError",
    "Segmenter",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "ZOO",
]
