"""Tiny synthetic datasets on disk, in the Cityscapes layout and in the custom layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 64, 128
# (Cityscapes labelId, trainId, colour): the colours are distinct so a small network can learn them.
SHAPES = {
    "sky": (23, 10, (70, 130, 180)),
    "building": (11, 2, (90, 90, 90)),
    "road": (7, 0, (128, 64, 128)),
    "car": (26, 13, (0, 0, 160)),
    "void": (0, 255, (20, 20, 20)),
}


def scene(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and its Cityscapes labelIds: sky over a building over road, a car, a void strip."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((HEIGHT, WIDTH), np.uint8)
    horizon, road_top = int(rng.integers(14, 22)), int(rng.integers(36, 44))
    ids[:horizon] = SHAPES["sky"][0]
    ids[horizon:road_top] = SHAPES["building"][0]
    ids[road_top:] = SHAPES["road"][0]
    x0 = int(rng.integers(8, WIDTH - 48))
    ids[road_top - 6 : road_top + 12, x0 : x0 + 36] = SHAPES["car"][0]
    ids[-4:, :] = SHAPES["void"][0]
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    for label_id, _, colour in SHAPES.values():
        image[ids == label_id] = colour
    noise = rng.integers(-12, 13, image.shape)
    return np.clip(image.astype(np.int64) + noise, 0, 255).astype(np.uint8), ids


def make_cityscapes(root: Path, n_train: int = 4, n_val: int = 2, train_ids: bool = True) -> Path:
    """ROOT/leftImg8bit/{train,val}/synth/*_leftImg8bit.png + gtFine labelIds (and labelTrainIds)."""
    from model.training.cityscapes import label_ids_to_train_ids

    for split, count, offset in (("train", n_train, 0), ("val", n_val, 100)):
        img_dir = root / "leftImg8bit" / split / "synth"
        gt_dir = root / "gtFine" / split / "synth"
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, ids = scene(offset + i)
            stem = f"synth_{i:06d}_000019"
            Image.fromarray(image).save(img_dir / f"{stem}_leftImg8bit.png")
            Image.fromarray(ids).save(gt_dir / f"{stem}_gtFine_labelIds.png")
            if train_ids:
                Image.fromarray(label_ids_to_train_ids(ids)).save(gt_dir / f"{stem}_gtFine_labelTrainIds.png")
    return root


CUSTOM_CLASSES = ["background", "vehicle", "sky"]
CUSTOM_PALETTE = [[0, 0, 0], [255, 0, 0], [0, 128, 255]]


def make_custom(root: Path, count: int = 4) -> Path:
    """ROOT/images/*.png, ROOT/masks/*.png (3 classes, 255 = ignore) and ROOT/classes.json."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    to_custom = np.full(256, 0, np.uint8)
    to_custom[SHAPES["car"][0]] = 1
    to_custom[SHAPES["sky"][0]] = 2
    to_custom[SHAPES["void"][0]] = 255
    for i in range(count):
        image, ids = scene(200 + i)
        Image.fromarray(image).save(root / "images" / f"img{i}.png")
        Image.fromarray(to_custom[ids]).save(root / "masks" / f"img{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": CUSTOM_CLASSES, "palette": CUSTOM_PALETTE}))
    return root
