"""Cityscapes labels: labelIds (0-33, as downloaded) to trainIds (0-18, 255 ignored), and
`bisenet prepare-cityscapes ROOT`, which writes `*_gtFine_labelTrainIds.png` beside each
`*_gtFine_labelIds.png` as mmsegmentation's `tools/dataset_converters/cityscapes.py` does."""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .data import IGNORE_INDEX, DatasetError

# Cityscapes labelIds 0-33 -> trainIds (cityscapesScripts `labels.py`); everything else is ignored.
# fmt: off
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                        24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# fmt: on


def label_id_lut() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes labelIds (0-33) -> trainIds (0-18), 255 for void and unknown ids."""
    if label_ids.dtype != np.uint8:
        label_ids = np.where((label_ids >= 0) & (label_ids < 256), label_ids, 0).astype(np.uint8)
    return label_id_lut()[label_ids]


def _convert_one(path: Path, overwrite: bool) -> bool:
    target = path.with_name(path.name.replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"))
    if target.exists() and not overwrite:
        return False
    train_ids = label_ids_to_train_ids(np.asarray(Image.open(path)))
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    Image.fromarray(train_ids, mode="L").save(tmp, format="PNG")
    os.replace(tmp, target)  # never leave a half-written label that looks complete
    return True


def prepare_cityscapes(root: str | os.PathLike, workers: int | None = None, overwrite: bool = False) -> int:
    """Write `*_gtFine_labelTrainIds.png` next to every `*_gtFine_labelIds.png`; returns how many."""
    gt = Path(root) / "gtFine"
    if not gt.is_dir():
        raise DatasetError(f"{gt} does not exist: ROOT must hold the Cityscapes gtFine/ and leftImg8bit/ folders")
    sources = sorted(gt.glob("*/*/*_gtFine_labelIds.png"))
    if not sources:
        raise DatasetError(f"no *_gtFine_labelIds.png files under {gt}/SPLIT/CITY/")
    written = 0
    with (
        ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool,
        tqdm(total=len(sources), desc="labelTrainIds", dynamic_ncols=True) as bar,
    ):
        for done in pool.map(lambda p: _convert_one(p, overwrite), sources):
            written += done
            bar.update()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bisenet prepare-cityscapes",
        description="Write *_gtFine_labelTrainIds.png beside each Cityscapes *_gtFine_labelIds.png.",
    )
    parser.add_argument("root", help="Cityscapes folder holding leftImg8bit/ and gtFine/")
    parser.add_argument("--workers", type=int, default=None, help="threads (default: up to 8)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing labelTrainIds files")
    args = parser.parse_args(argv)
    try:
        written = prepare_cityscapes(args.root, args.workers, args.overwrite)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written} labelTrainIds files under {Path(args.root) / 'gtFine'}")
    return 0
