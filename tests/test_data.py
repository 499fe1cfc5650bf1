"""Datasets, label conversion, the training augmentation and the bad-input checks."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from synthetic_data import CUSTOM_CLASSES, CUSTOM_PALETTE, SHAPES, make_cityscapes, make_custom, scene

from model.training import cityscapes, data
from model.training.augment import (
    PhotoMetricDistortion,
    TrainTransform,
    hsv_to_rgb,
    random_crop_bbox,
    random_resize_size,
    resize_image,
    resize_label,
    rgb_to_hsv,
)
from model.training.cityscapes import label_ids_to_train_ids
from model.training.data import DatasetError, IterationSampler, check_dataset, open_dataset
from model.zoo import CITYSCAPES_CLASSES

# -- Cityscapes label conversion ---------------------------------------------------------------

# cityscapesScripts labels.py: (labelId, trainId) for every id; void classes and unknown ids -> 255.
# fmt: off
CITYSCAPES_TABLE = [(0, 255), (1, 255), (2, 255), (3, 255), (4, 255), (5, 255), (6, 255), (7, 0), (8, 1), (9, 255),
                    (10, 255), (11, 2), (12, 3), (13, 4), (14, 255), (15, 255), (16, 255), (17, 5), (18, 255), (19, 6),
                    (20, 7), (21, 8), (22, 9), (23, 10), (24, 11), (25, 12), (26, 13), (27, 14), (28, 15), (29, 255),
                    (30, 255), (31, 16), (32, 17), (33, 18), (34, 255), (200, 255), (255, 255)]
# fmt: on


def test_label_ids_to_train_ids_matches_the_cityscapes_table():
    ids = np.array([i for i, _ in CITYSCAPES_TABLE], np.uint8)
    assert label_ids_to_train_ids(ids).tolist() == [t for _, t in CITYSCAPES_TABLE]
    # every train id 0-18 is reached exactly once
    assert sorted(set(label_ids_to_train_ids(np.arange(256, dtype=np.uint8)).tolist()) - {255}) == list(range(19))


def test_prepare_cityscapes_writes_train_ids(tmp_path, capsys):
    root = make_cityscapes(tmp_path / "cs", n_train=2, n_val=1, train_ids=False)
    with pytest.raises(DatasetError, match="prepare-cityscapes"):
        open_dataset(root, "train")  # labelIds only: the error says what to run
    assert cityscapes.main([str(root)]) == 0
    assert "wrote 3 labelTrainIds files" in capsys.readouterr().out
    _, ids = scene(0)
    written = np.asarray(Image.open(root / "gtFine/train/synth/synth_000000_000019_gtFine_labelTrainIds.png"))
    for label_id, train_id, _ in SHAPES.values():
        assert (written[ids == label_id] == train_id).all()
    assert set(np.unique(written)) == {0, 2, 10, 13, 255}
    assert cityscapes.main([str(root)]) == 0  # existing files are kept
    assert "wrote 0" in capsys.readouterr().out
    info = open_dataset(root, "train")
    assert (info.layout, len(info.samples), info.classes) == ("cityscapes", 2, CITYSCAPES_CLASSES)
    check_dataset(info)


def test_custom_layout_and_classes_file(tmp_path):
    root = make_custom(tmp_path / "own", count=3)
    info = open_dataset(root, "train")
    assert info.layout == "custom" and info.classes == tuple(CUSTOM_CLASSES)
    assert info.palette == tuple(tuple(c) for c in CUSTOM_PALETTE)
    assert [s.image.stem for s in info.samples] == ["img0", "img1", "img2"]
    assert open_dataset(root, "val").samples == info.samples  # flat layout: one set for both
    check_dataset(info)
    # split folders are used when present
    for sub in ("images/train", "masks/train"):
        (root / sub).mkdir()
    for i in (0, 1):
        (root / "images" / f"img{i}.png").rename(root / "images/train" / f"img{i}.png")
        (root / "masks" / f"img{i}.png").rename(root / "masks/train" / f"img{i}.png")
    assert len(open_dataset(root, "train").samples) == 2


def test_classes_file_without_palette_and_yaml_without_pyyaml(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"classes": ["a", "b"]}))
    classes, palette = data.load_classes(path)
    assert classes == ("a", "b") and len(palette) == 2
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("classes: [a, b]\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        with pytest.raises(DatasetError, match="PyYAML"):
            data.load_classes(yaml_path)
    else:
        assert data.load_classes(yaml_path)[0] == ("a", "b")


# -- bad input: each is refused with a message naming the problem -------------------------------
def test_missing_and_empty_dataset_folders(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is empty"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="neither a Cityscapes folder"):
        open_dataset(tmp_path / "odd")
    (tmp_path / "noimg" / "images").mkdir(parents=True)
    (tmp_path / "noimg" / "masks").mkdir()
    (tmp_path / "noimg" / "classes.json").write_text('{"classes": ["a"]}')
    with pytest.raises(DatasetError, match="hold no images"):
        open_dataset(tmp_path / "noimg")


def test_image_without_label_and_label_without_image(tmp_path):
    root = make_cityscapes(tmp_path / "cs", n_train=2, n_val=1)
    (root / "gtFine/train/synth/synth_000000_000019_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(DatasetError, match="images without a label: synth/synth_000000_000019"):
        open_dataset(root, "train")
    custom = make_custom(tmp_path / "own", count=2)
    (custom / "images" / "img1.png").unlink()
    with pytest.raises(DatasetError, match="masks without an image: img1"):
        open_dataset(custom, "train")


def test_size_mismatch_and_bad_label_values(tmp_path):
    root = make_custom(tmp_path / "own", count=3)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "img0.png")
    bad = np.zeros((64, 128), np.uint8)
    bad[0, :3] = [3, 7, 255]  # 3 classes: 3 and 7 are out of range, 255 is fine
    Image.fromarray(bad).save(root / "masks" / "img2.png")
    with pytest.raises(DatasetError) as err:
        check_dataset(open_dataset(root), show_progress=False)
    message = str(err.value)
    assert "2 bad sample(s)" in message
    assert "img0.png is 128x64 but its label img0.png is 10x10" in message
    assert "holds values [3, 7] outside 0-2" in message
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(root / "masks" / "img1.png")
    with pytest.raises(DatasetError, match="label image mode RGB"):
        check_dataset(open_dataset(root), show_progress=False)


def test_palette_length_mismatch_and_bad_class_files(tmp_path):
    root = make_custom(tmp_path / "own", count=1)
    (root / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c"], "palette": [[0, 0, 0], [1, 1, 1]]}))
    with pytest.raises(DatasetError, match="the palette has 2 colours for 3 classes"):
        open_dataset(root)
    (root / "classes.json").write_text(json.dumps({"classes": ["a"], "palette": [[0, 0, 300]]}))
    with pytest.raises(DatasetError, match="palette entry 0"):
        open_dataset(root)
    (root / "classes.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        open_dataset(root)
    (root / "classes.json").unlink()
    with pytest.raises(DatasetError, match="no classes.json"):
        open_dataset(root)


# -- augmentation ------------------------------------------------------------------------------
# Outputs of OpenCV (cv2.resize INTER_LINEAR / INTER_NEAREST, cv2.cvtColor; the same in 4.x and
# 5.0), which mmcv calls and which the augmentation now calls too: these pin that it is OpenCV's
# fixed-point arithmetic, not another bilinear resize or HSV formula, that runs.
# fmt: off
IMG_5x7 = [[[139, 74, 229], [241, 169, 65], [6, 160, 149], [106, 38, 175], [188, 205, 175], [229, 98, 249], [10, 148, 95]],
           [[86, 147, 198], [66, 39, 106], [213, 171, 45], [167, 57, 69], [81, 55, 14], [153, 178, 215], [76, 52, 39]],
           [[250, 72, 215], [50, 161, 223], [112, 172, 161], [233, 38, 17], [89, 1, 221], [6, 242, 127], [143, 6, 60]],
           [[210, 94, 25], [166, 33, 249], [189, 12, 204], [33, 57, 124], [30, 199, 149], [202, 119, 72], [220, 3, 209]],
           [[122, 136, 147], [77, 133, 82], [115, 87, 162], [230, 70, 71], [240, 62, 47], [184, 31, 34], [63, 65, 146]]]
CV2_DOWN_3x4 = [[[144, 109, 166], [81, 149, 117], [149, 141, 123], [96, 119, 137]],
                [[175, 105, 218], [127, 155, 143], [107, 6, 196], [92, 95, 85]],
                [[135, 113, 118], [143, 62, 165], [169, 102, 82], [143, 50, 122]]]
CV2_UP_ROWS_0_AND_7 = [[[139, 74, 229], [185, 117, 154], [219, 168, 73], [70, 162, 126], [42, 115, 158], [106, 38, 175],
                        [158, 144, 175], [199, 176, 195], [225, 108, 242], [110, 125, 165], [10, 148, 95]],
                       [[122, 136, 147], [102, 134, 117], [80, 129, 89], [105, 99, 140], [157, 81, 129], [230, 70, 71],
                        [236, 65, 56], [225, 53, 43], [189, 34, 35], [118, 50, 95], [63, 65, 146]]]
CV2_RGB2HSV = ([[[255, 0, 0], [12, 200, 99], [250, 251, 3], [7, 7, 7], [128, 64, 128], [0, 0, 142]]],
               [[[0, 255, 255], [74, 240, 200], [30, 252, 251], [0, 0, 7], [150, 128, 128], [120, 255, 142]]])
CV2_HSV2RGB = ([[[1, 153, 25], [3, 187, 75], [1, 25, 153], [90, 255, 255], [179, 10, 200], [0, 0, 77]]],
               [[[25, 10, 10], [75, 26, 20], [153, 138, 138], [0, 255, 255], [200, 192, 192], [77, 77, 77]]])
# fmt: on


def test_resize_is_opencvs():
    img = np.array(IMG_5x7, np.uint8)
    assert resize_image(img, (3, 4)).tolist() == CV2_DOWN_3x4
    up = resize_image(img, (8, 11))
    assert up.shape == (8, 11, 3) and up[[0, 7]].tolist() == CV2_UP_ROWS_0_AND_7
    # within 1 of torch's bilinear (same sampling positions, integer rounding)
    ref = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(8, 11), mode="bilinear")
    assert (ref[0].permute(1, 2, 0).numpy() - up).__abs__().max() <= 1
    # nearest for labels: OpenCV's floor(dst * (1 / (out / in))), not floor(dst * in / out)
    row = (np.arange(300) % 256).astype(np.uint8)[None]
    assert resize_label(row, (1, 390))[0, [39, 65, 78, 117]].tolist() == [29, 49, 59, 89]


def test_hsv_is_opencvs_and_rgb_equals_mmsegs_bgr():
    rgb, hsv = (np.array(a, np.uint8) for a in CV2_RGB2HSV)
    assert (rgb_to_hsv(rgb) == hsv).all()
    hsv, rgb = (np.array(a, np.uint8) for a in CV2_HSV2RGB)
    assert (hsv_to_rgb(hsv) == rgb).all()
    # mmseg converts BGR images (COLOR_BGR2HSV / HSV2BGR); on RGB the same HSV and the same pixels
    # come out, on row widths that take OpenCV's vector kernels and its scalar tail alike
    rng = np.random.default_rng(0)
    for width in (6, 33, 1024):
        image = rng.integers(0, 256, (4, width, 3), dtype=np.uint8)
        hsv = rgb_to_hsv(image)
        assert (hsv == cv2.cvtColor(image[..., ::-1].copy(), cv2.COLOR_BGR2HSV)).all()
        hsv[..., 0] = rng.integers(0, 180, hsv.shape[:2])
        assert (hsv_to_rgb(hsv) == cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[..., ::-1]).all()


def test_train_transform_is_resize_of_the_whole_image_then_crop():
    """mmseg's order: resize image (INTER_LINEAR) and label (INTER_NEAREST), crop both alike."""
    image, ids = scene(2)
    label = label_ids_to_train_ids(ids)
    t = TrainTransform(crop=(48, 80), scale=(160, 80), photometric=None, flip_prob=0.0)
    for seed in range(6):
        img, lab, (h, w) = t(image, label, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        size = random_resize_size(*label.shape, t.scale, t.ratio_range, rng)
        big_label = cv2.resize(label, size[::-1], interpolation=cv2.INTER_NEAREST)
        y0, y1, x0, x1 = random_crop_bbox(big_label, t.crop, t.cat_max_ratio, rng)
        big_image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
        assert (h, w) == (y1 - y0, x1 - x0)
        assert (img[:h, :w] == big_image[y0:y1, x0:x1]).all() and (lab[:h, :w] == big_label[y0:y1, x0:x1]).all()


def test_photometric_distortion_is_seeded_and_changes_colours():
    image, _ = scene(3)
    distort = PhotoMetricDistortion()
    a = distort(image, np.random.default_rng(5))
    b = distort(image, np.random.default_rng(5))
    assert a.dtype == np.uint8 and a.shape == image.shape and (a == b).all()
    changed = [not (distort(image, np.random.default_rng(s)) == image).all() for s in range(8)]
    assert any(changed)


def test_train_transform_shapes_padding_and_determinism():
    image, ids = scene(1)
    label = label_ids_to_train_ids(ids)
    t = TrainTransform(crop=(96, 96), scale=(128, 64), ratio_range=(0.5, 2.0))
    for seed in range(6):
        img, lab, valid = t(image, label, np.random.default_rng(seed))
        assert img.shape == (96, 96, 3) and lab.shape == (96, 96) and img.dtype == lab.dtype == np.uint8
        h, w = valid
        assert (lab[h:] == 255).all() and (lab[:, w:] == 255).all() and (img[h:] == 0).all()
        assert set(np.unique(lab[:h, :w])) <= {0, 2, 10, 13, 255}
    again = t(image, label, np.random.default_rng(4))
    assert all((x == y).all() for x, y in zip(t(image, label, np.random.default_rng(4))[:2], again[:2]))
    # ratio 0.5 of scale (128, 64) on a 64x128 image gives 32x64: padded to the 96x96 crop
    small = TrainTransform(crop=(96, 96), scale=(128, 64), ratio_range=(0.5, 0.5), photometric=None, flip_prob=0)
    _, lab, valid = small(image, label, np.random.default_rng(0))
    assert valid == (32, 64)


def test_random_crop_avoids_single_class_crops():
    label = np.zeros((100, 100), np.uint8)
    label[:, 70:] = 1  # 30% of the image is class 1
    label[:5] = 255  # ignored pixels do not count

    def balanced_share(cat_max_ratio: float) -> float:
        rng = np.random.default_rng(0)
        boxes = [random_crop_bbox(label, (20, 20), cat_max_ratio, rng) for _ in range(200)]
        ok = 0
        for y0, y1, x0, x1 in boxes:
            assert (y1 - y0, x1 - x0) == (20, 20)
            counts = np.bincount(label[y0:y1, x0:x1].ravel(), minlength=256)[:255]
            ok += counts.max() / counts.sum() < 0.75
        return ok / len(boxes)

    # 9 of the 81 crop positions are balanced: one draw finds one 11% of the time, eleven ~72%
    assert balanced_share(1.0) < 0.2
    assert balanced_share(0.75) > 0.6


def test_iteration_sampler_splits_ranks_and_resumes():
    samplers = [IterationSampler(5, 2, world_size=2, rank=r, seed=3) for r in range(2)]
    for iteration in range(4):
        a, b = (s.batch(iteration) for s in samplers)
        positions = [p for _, p in a + b]
        assert len(set(positions)) == 4  # ranks never share a stream position
    stream = iter(IterationSampler(5, 2, seed=3))
    first = [next(stream) for _ in range(6)]
    resumed = iter(IterationSampler(5, 2, seed=3, start_iter=3))
    assert [next(resumed) for _ in range(3)] == first[3:]
    # each pass over the data is a permutation
    assert sorted(i for batch in first[:5] for i, _ in batch) == sorted(list(range(5)) * 2)
