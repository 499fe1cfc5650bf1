"""Datasets for training and evaluation: Cityscapes and a simple custom layout.

Cityscapes (standard layout, labels converted once with `prepare-cityscapes`):
    ROOT/leftImg8bit/{train,val}/CITY/*_leftImg8bit.png
    ROOT/gtFine/{train,val}/CITY/*_gtFine_labelIds.png        (as downloaded)
    ROOT/gtFine/{train,val}/CITY/*_gtFine_labelTrainIds.png   (written by prepare-cityscapes)

Custom (your own data):
    ROOT/classes.json       {"classes": ["background", "cat", ...], "palette": [[0, 0, 0], ...]}
    ROOT/images/[SPLIT/]NAME.{jpg,png,...}
    ROOT/masks/[SPLIT/]NAME.png   one channel, pixel = class index, 255 = ignore
  With `images/train` and `images/val` the splits are those folders; otherwise the flat folders
  serve as both the training and the validation set.

`bisenet prepare-cityscapes ROOT` writes the train-id labels (cityscapes.py);
`bisenet check-data ROOT` runs every check training runs before its first step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..zoo import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """The dataset on disk cannot be used; the message names the files and the fix."""


@dataclass(frozen=True)
class Sample:
    image: Path
    label: Path


@dataclass(frozen=True)
class DatasetInfo:
    root: Path
    layout: str  # "cityscapes" or "custom"
    split: str
    samples: tuple[Sample, ...]
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# -- discovering datasets ----------------------------------------------------------------------
def _pairing_error(root: Path, images_only: list[str], labels_only: list[str], label_kind: str) -> DatasetError:
    lines = [f"images and {label_kind} under {root} do not pair up:"]
    for title, names in (
        (f"images without a {label_kind[:-1]}", images_only),
        (f"{label_kind} without an image", labels_only),
    ):
        if names:
            shown = ", ".join(names[:5]) + (f" ... ({len(names)} in all)" if len(names) > 5 else "")
            lines.append(f"  {title}: {shown}")
    return DatasetError("\n".join(lines))


def cityscapes_samples(root: Path, split: str) -> tuple[Sample, ...]:
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DatasetError(
                f"{folder} does not exist (Cityscapes layout: leftImg8bit/{split}/CITY/, gtFine/{split}/CITY/)"
            )
    images = {
        str(p.relative_to(image_dir))[: -len("_leftImg8bit.png")]: p for p in image_dir.glob("*/*_leftImg8bit.png")
    }
    labels = {
        str(p.relative_to(label_dir))[: -len("_gtFine_labelTrainIds.png")]: p
        for p in label_dir.glob("*/*_gtFine_labelTrainIds.png")
    }
    if not images:
        raise DatasetError(f"{image_dir} holds no CITY/*_leftImg8bit.png images")
    if not labels:
        if any(label_dir.glob("*/*_gtFine_labelIds.png")):
            raise DatasetError(
                f"{label_dir} has labelIds but no labelTrainIds files: run `bisenet prepare-cityscapes {root}` first"
            )
        raise DatasetError(f"{label_dir} holds no CITY/*_gtFine_labelTrainIds.png labels")
    if images.keys() != labels.keys():
        raise _pairing_error(
            root, sorted(images.keys() - labels.keys()), sorted(labels.keys() - images.keys()), "labels"
        )
    return tuple(Sample(images[k], labels[k]) for k in sorted(images))


def _by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes:
            if p.stem in found:
                raise DatasetError(f"two files with the stem {p.stem!r} in {folder}: {found[p.stem].name}, {p.name}")
            found[p.stem] = p
    return found


def custom_split_dirs(root: Path, split: str) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    for folder in (images, masks):
        if not folder.is_dir():
            raise DatasetError(f"{folder} does not exist (custom layout: images/, masks/ and classes.json)")
    if (images / split).is_dir():
        return images / split, masks / split
    return images, masks


def custom_samples(root: Path, split: str) -> tuple[Sample, ...]:
    image_dir, mask_dir = custom_split_dirs(root, split)
    if not mask_dir.is_dir():
        raise DatasetError(f"{image_dir} exists but {mask_dir} does not")
    images, masks = _by_stem(image_dir, IMAGE_SUFFIXES), _by_stem(mask_dir, MASK_SUFFIXES)
    if not images and not masks:
        raise DatasetError(f"{image_dir} and {mask_dir} hold no images ({', '.join(IMAGE_SUFFIXES)})")
    if images.keys() != masks.keys():
        raise _pairing_error(root, sorted(images.keys() - masks.keys()), sorted(masks.keys() - images.keys()), "masks")
    return tuple(Sample(images[k], masks[k]) for k in sorted(images))


def load_classes(path: str | os.PathLike) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """Class names and palette from a JSON (or, with PyYAML installed, YAML) file.

    Format: {"classes": [names...], "palette": [[r, g, b], ...]}; the palette is optional (a fixed
    one is generated) but when given it needs one colour per class.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DatasetError(f"cannot read the class file {path}: {exc}") from exc
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise DatasetError(f"{path} is YAML but PyYAML is not installed; use classes.json instead") from exc
        spec = yaml.safe_load(text)
    else:
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("classes"), list) or not spec["classes"]:
        raise DatasetError(f'{path} must hold {{"classes": [names...], "palette": [[r, g, b], ...]}}')
    classes = tuple(str(c) for c in spec["classes"])
    if len(set(classes)) != len(classes):
        raise DatasetError(f"{path}: class names repeat: {classes}")
    if not 1 <= len(classes) <= IGNORE_INDEX:
        raise DatasetError(f"{path}: {len(classes)} classes; between 1 and {IGNORE_INDEX} are supported")
    palette = spec.get("palette")
    if palette is None:
        rng = np.random.default_rng(0)
        return classes, tuple(tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in classes)
    if not isinstance(palette, list) or len(palette) != len(classes):
        got = len(palette) if isinstance(palette, list) else type(palette).__name__
        raise DatasetError(f"{path}: the palette has {got} colours for {len(classes)} classes")
    for i, colour in enumerate(palette):
        if not (
            isinstance(colour, list | tuple)
            and len(colour) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in colour)
        ):
            raise DatasetError(f"{path}: palette entry {i} ({colour!r}) is not [r, g, b] with integers 0-255")
    return classes, tuple(tuple(c) for c in palette)


def find_classes_file(root: Path) -> Path | None:
    for name in ("classes.json", "classes.yaml", "classes.yml"):
        if (root / name).is_file():
            return root / name
    return None


def detect_layout(root: Path) -> str:
    if (root / "leftImg8bit").is_dir() or (root / "gtFine").is_dir():
        return "cityscapes"
    if (root / "images").is_dir() or (root / "masks").is_dir():
        return "custom"
    raise DatasetError(
        f"{root} is neither a Cityscapes folder (leftImg8bit/, gtFine/) nor a custom one (images/, masks/)"
    )


def open_dataset(
    root: str | os.PathLike, split: str = "train", classes_file: str | os.PathLike | None = None
) -> DatasetInfo:
    """Find the samples and classes of `split` under `root`; raises DatasetError when unusable."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not any(root.iterdir()):
        raise DatasetError(f"dataset folder {root} is empty")
    layout = detect_layout(root)
    if layout == "cityscapes":
        samples = cityscapes_samples(root, split)
        classes, palette = CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
    else:
        samples = custom_samples(root, split)
        classes_file = classes_file or find_classes_file(root)
        if classes_file is None:
            raise DatasetError(f"{root} has no classes.json naming the classes (see docs/training.md)")
    if classes_file is not None:
        classes, palette = load_classes(classes_file)
    return DatasetInfo(root, layout, split, samples, tuple(classes), tuple(tuple(c) for c in palette))


# -- checks run before training ----------------------------------------------------------------
def read_label(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "1"):
            raise DatasetError(f"{path}: label image mode {im.mode}; labels must be one channel of class indices")
        return np.asarray(im)


def read_image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _check_sample(sample: Sample, num_classes: int, values: bool) -> str | None:
    try:
        with Image.open(sample.image) as im, Image.open(sample.label) as lab:
            if im.size != lab.size:
                return f"{sample.image.name} is {im.size[0]}x{im.size[1]} but its label {sample.label.name} is {lab.size[0]}x{lab.size[1]}"
        if values:
            label = read_label(sample.label).astype(np.int64, copy=False)
            counts = np.bincount(label.ravel(), minlength=IGNORE_INDEX + 1)
            bad = [int(v) for v in np.flatnonzero(counts) if num_classes <= v != IGNORE_INDEX]
            if bad:
                return (
                    f"{sample.label} holds values {bad[:10]} outside 0-{num_classes - 1} "
                    f"(and not {IGNORE_INDEX}, the ignore value)"
                )
    except DatasetError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read {sample.image.name} / {sample.label.name}: {exc}"
    return None


def check_dataset(
    info: DatasetInfo, values: bool = True, workers: int | None = None, show_progress: bool = True
) -> None:
    """Every image readable with a same-sized label whose values are classes or 255.

    Reading every label costs a pass over the dataset (seconds for Cityscapes on a few cores); it
    runs once before training so that a bad file fails the run at once, not hours into it.
    """
    if not info.samples:
        raise DatasetError(f"{info.root} ({info.split}) holds no samples")
    problems: list[str] = []
    bar = tqdm(total=len(info.samples), desc=f"checking {info.split}", disable=not show_progress, dynamic_ncols=True)
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        for problem in pool.map(lambda s: _check_sample(s, info.num_classes, values), info.samples):
            if problem:
                problems.append(problem)
            bar.update()
    bar.close()
    if problems:
        shown = "\n  ".join(problems[:10]) + (
            f"\n  ... ({len(problems)} problems in all)" if len(problems) > 10 else ""
        )
        raise DatasetError(f"{info.root} ({info.split}): {len(problems)} bad sample(s):\n  {shown}")


# -- torch datasets ----------------------------------------------------------------------------
class TrainDataset(torch.utils.data.Dataset):
    """Items are keyed by (index, stream position): the augmentation's random draws come from the
    position, so a sample is the same whichever worker makes it and after a resume."""

    def __init__(self, info: DatasetInfo, transform, seed: int = 0):
        self.info, self.transform, self.seed = info, transform, seed

    def __len__(self) -> int:
        return len(self.info.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, position = key
        sample = self.info.samples[index]
        image, label = read_image(sample.image), read_label(sample.label)
        if image.shape[:2] != label.shape:
            raise DatasetError(f"{sample.image.name} and {sample.label.name} differ in size")
        bad = (label >= self.info.num_classes) & (label != IGNORE_INDEX)
        if bad.any():  # caught here too when the up-front check was skipped
            values = sorted({int(v) for v in np.unique(label[bad])})[:10]
            raise DatasetError(
                f"{sample.label} holds values {values} outside 0-{self.info.num_classes - 1} (and not 255)"
            )
        rng = np.random.default_rng([self.seed, position])
        image, label, valid = self.transform(image, label.astype(np.uint8, copy=False), rng)
        return (
            torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            torch.from_numpy(label),
            torch.tensor(valid),
        )


class EvalDataset(torch.utils.data.Dataset):
    """Whole images and labels at their original size (the test pipeline resizes on the device)."""

    def __init__(self, info: DatasetInfo, indices: Sequence[int] | None = None):
        self.info = info
        self.indices = list(range(len(info.samples))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        sample = self.info.samples[self.indices[i]]
        image, label = read_image(sample.image), read_label(sample.label)
        return torch.from_numpy(image.copy()), torch.from_numpy(label.astype(np.uint8))


class IterationSampler(torch.utils.data.Sampler):
    """Infinite batches for iteration-based training, resumable at any iteration.

    The sample stream is a fresh seeded permutation of the dataset per pass. Global batch `i`
    takes stream positions [i*B*W, (i+1)*B*W) and rank r its r-th block of B, so every rank sees
    different images and a resumed run continues exactly where the interrupted one stopped.
    """

    def __init__(
        self, size: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0, start_iter: int = 0
    ):
        self.size, self.batch_size, self.world_size, self.rank = size, batch_size, world_size, rank
        self.seed, self.start_iter = seed, start_iter
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _index(self, position: int) -> int:
        epoch = position // self.size
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return int(self._perm[position % self.size])

    def batch(self, iteration: int) -> list[tuple[int, int]]:
        first = (iteration * self.world_size + self.rank) * self.batch_size
        return [(self._index(p), p) for p in range(first, first + self.batch_size)]

    def __iter__(self):
        iteration = self.start_iter
        while True:
            yield self.batch(iteration)
            iteration += 1


# -- command line ------------------------------------------------------------------------------
def check_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bisenet check-data", description="Run the checks training runs first.")
    parser.add_argument("root", help="dataset folder (Cityscapes or images/ + masks/)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--classes", default=None, help="class file (default: ROOT/classes.json; Cityscapes built in)")
    args = parser.parse_args(argv)
    try:
        info = open_dataset(args.root, args.split, args.classes)
        check_dataset(info)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{info.root} ({info.layout}, {info.split}): {len(info.samples)} samples, {info.num_classes} classes, OK")
    return 0
