"""Write a small Cityscapes-layout dataset of full-size (1024x2048) frames for timing training.

The frames are smooth random colour fields and their labels random train-id regions: enough for
images/s and peak memory (which do not depend on the content), not for accuracy.

    python tools/synthetic_train_data.py DIR [--count 16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 1024, 2048
LABEL_IDS = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33], np.uint8)


def frame(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An RGB frame, its labelIds and its trainIds (the index of each labelId in LABEL_IDS)."""
    coarse = rng.integers(0, 256, (HEIGHT // 64, WIDTH // 64, 3), np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BILINEAR))
    regions = rng.integers(0, len(LABEL_IDS), (HEIGHT // 128, WIDTH // 128), np.uint8)
    train_ids = np.kron(regions, np.ones((128, 128), np.uint8))
    return image, LABEL_IDS[train_ids], train_ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--count", type=int, default=16, help="training frames (the val split gets 2)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    for split, count in (("train", args.count), ("val", 2)):
        img_dir = args.root / "leftImg8bit" / split / "synth"
        gt_dir = args.root / "gtFine" / split / "synth"
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, ids, train_ids = frame(rng)
            stem = f"synth_{i:06d}_000019"
            Image.fromarray(image).save(img_dir / f"{stem}_leftImg8bit.png", compress_level=1)
            Image.fromarray(ids).save(gt_dir / f"{stem}_gtFine_labelIds.png", compress_level=1)
            Image.fromarray(train_ids).save(gt_dir / f"{stem}_gtFine_labelTrainIds.png", compress_level=1)
    print(f"wrote {args.count} + 2 frames of {HEIGHT}x{WIDTH} under {args.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
