"""The IoU metric (against a hand computation) and `bisenet evaluate`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from synthetic_data import make_cityscapes, make_custom

from model import build_model
from model.training.data import open_dataset
from model.training.evaluate import evaluate, main, predict_multi_scale, predict_single_scale, tta_size
from model.training.iou import IoUMetric, compute_metrics, format_table, intersect_and_union

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_iou_metric_matches_a_hand_computation():
    metric = IoUMetric(num_classes=4)
    # image 1: the 255 pixel is left out; pairs (pred, label) = (0,0) (0,1) (1,1) (2,2) (2,0)
    metric.update(torch.tensor([[0, 0, 1], [1, 2, 2]]), torch.tensor([[0, 1, 1], [255, 2, 0]]))
    # image 2: class 3 is predicted but never labelled -> IoU 0, Acc nan
    metric.update(torch.tensor([[3, 1]]), torch.tensor([[1, 1]]))
    intersect, union, pred, label = metric.areas.tolist()
    assert intersect == [1, 2, 1, 0]
    assert pred == [2, 2, 2, 1]
    assert label == [2, 4, 1, 0]
    assert union == [3, 4, 2, 1]
    m = metric.compute()
    assert m["IoU"] == [33.33, 50.0, 50.0, 0.0]
    assert m["Acc"][:3] == [50.0, 50.0, 100.0] and math.isnan(m["Acc"][3])
    assert m["mIoU"] == 33.33  # (1/3 + 1/2 + 1/2 + 0) / 4
    assert m["mAcc"] == 66.67  # nan-mean of (1/2, 1/2, 1)
    assert m["aAcc"] == 57.14  # 4 correct of 7 labelled pixels


def test_classes_absent_everywhere_are_nan_and_left_out_of_the_means():
    m = compute_metrics([5, 0, 0], [5, 0, 2], [5, 0, 2], [5, 0, 0])
    assert m["IoU"][0] == 100.0 and math.isnan(m["IoU"][1]) and m["IoU"][2] == 0.0
    assert m["mIoU"] == 50.0 and m["mAcc"] == 100.0 and m["aAcc"] == 100.0


def test_iou_metric_agrees_with_a_brute_force_count():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 6, (40, 50))
    label = rng.integers(0, 6, (40, 50))
    label[rng.random((40, 50)) < 0.2] = 255
    areas = [a.tolist() for a in intersect_and_union(torch.from_numpy(pred), torch.from_numpy(label), 6)]
    valid = label != 255
    for c in range(6):
        p, g = (pred == c) & valid, (label == c) & valid
        assert [areas[0][c], areas[1][c], areas[2][c], areas[3][c]] == [(p & g).sum(), (p | g).sum(), p.sum(), g.sum()]


def test_format_table_lists_every_class():
    m = compute_metrics([1, 0], [2, 0], [1, 0], [2, 0])
    table = format_table(["road", "sky"], m)
    assert "| road  |  50.00 |  50.00 |" in table and "| sky   |    nan |    nan |" in table
    assert table.endswith("aAcc: 50.00  mIoU: 50.00  mAcc: 50.00")


def test_tta_sizes_follow_mmcv_rescale():
    assert tta_size(1024, 2048, 0.5) == (512, 1024)
    assert tta_size(1024, 2048, 1.75) == (1792, 3584)
    assert tta_size(500, 741, 0.75) == (375, 556)


def test_multi_scale_with_one_ratio_and_no_flip_is_single_scale():
    torch.manual_seed(0)
    net = build_model("bisenetv1_r18", aux_heads=False).eval()
    image = torch.randint(0, 256, (48, 80, 3), dtype=torch.uint8)
    with torch.inference_mode():
        single = predict_single_scale(net, image, scale=(80, 48))
        multi = predict_multi_scale(net, image, ratios=(1.0,), flip=False)
        both = predict_multi_scale(net, image, ratios=(0.5, 1.0), flip=True)
    assert torch.equal(single, multi)
    assert both.shape == (48, 80) and both.dtype == torch.int64


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = build_model("bisenetv1_r18")
    path = tmp_path_factory.mktemp("eval") / "r18.pth"
    torch.save({"meta": {"arch": "bisenetv1_r18"}, "state_dict": net.state_dict()}, path)
    return path


def test_evaluate_cli_prints_the_table_and_writes_json(tmp_path, random_checkpoint, capsys):
    root = make_cityscapes(tmp_path / "cs", n_train=1, n_val=2)
    out = tmp_path / "m.json"
    args = [str(random_checkpoint), "--data", str(root), "--test-scale", "128x64", "--workers", "0", "--device", "cpu"]
    assert main(args + ["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "single scale" in printed and "| traffic light |" in printed and "aAcc:" in printed
    result = json.loads(out.read_text())
    assert len(result["IoU"]) == 19 and result["split"] == "val"
    net = build_model("bisenetv1_r18", aux_heads=False)
    net.load_state_dict(torch.load(random_checkpoint)["state_dict"], strict=False)
    direct = evaluate(net, open_dataset(root, "val"), torch.device("cpu"), scale=(128, 64), workers=0)
    assert result["mIoU"] == direct["mIoU"] or (math.isnan(result["mIoU"]) and math.isnan(direct["mIoU"]))
    assert main(args + ["--aug-test", "--ratios", "0.5,1.0"]) == 0
    assert "multi-scale (0.5, 1.0) + flip" in capsys.readouterr().out


def test_evaluate_cli_refuses_a_class_count_mismatch(tmp_path, random_checkpoint, capsys):
    root = make_custom(tmp_path / "own", count=1)
    assert main([str(random_checkpoint), "--data", str(root), "--device", "cpu", "--workers", "0"]) == 2
    assert "predicts 19 classes but" in capsys.readouterr().err
