"""ONNX export: onnxruntime reproduces PyTorch, with a dynamic batch dimension."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from model.export import build_parser, main
from model.transforms import normalise

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

HEIGHT, WIDTH = 64, 128


@pytest.fixture(scope="module")
def net(varied_r18_net):
    return varied_r18_net


@pytest.fixture(scope="module")
def inputs(photo) -> torch.Tensor:
    crops = [photo[:HEIGHT, :WIDTH], photo[200 : 200 + HEIGHT, 300 : 300 + WIDTH], photo[-HEIGHT:, -WIDTH:]]
    return normalise(torch.from_numpy(np.stack(crops)), (HEIGHT, WIDTH))


def export(tmp_path_factory, checkpoint: str, outputs: str) -> str:
    path = tmp_path_factory.mktemp("onnx") / f"r18_{outputs}.onnx"
    argv = ["--model", "bisenetv1_r18", "--weights", checkpoint, "--output", str(path)]
    argv += ["--height", str(HEIGHT), "--width", str(WIDTH), "--outputs", outputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
        assert main(argv) == 0
    return str(path)


@pytest.fixture(scope="module")
def logits_model(tmp_path_factory, varied_r18_checkpoint):
    return export(tmp_path_factory, varied_r18_checkpoint, "logits")


@pytest.fixture(scope="module")
def labels_model(tmp_path_factory, varied_r18_checkpoint):
    return export(tmp_path_factory, varied_r18_checkpoint, "labels")


def session(path: str):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def test_logits_match_pytorch_for_any_batch(logits_model, net, inputs):
    sess = session(logits_model)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "image" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, HEIGHT, WIDTH]
    assert out.name == "logits" and out.shape[1:] == [19, HEIGHT // 8, WIDTH // 8]
    with torch.inference_mode():
        ref = net(inputs).numpy()
    for n in (1, 3):  # exported with batch 2: other batch sizes must run too
        got = sess.run(None, {"image": inputs[:n].numpy()})[0]
        assert got.shape == ref[:n].shape
        assert np.abs(got - ref[:n]).max() <= 1e-4 * np.abs(ref).max()
        assert (got.argmax(1) == ref[:n].argmax(1)).mean() >= 0.999


def test_labels_output_matches_pytorch(labels_model, net, inputs):
    sess = session(labels_model)
    got = sess.run(None, {"image": inputs.numpy()})[0]
    with torch.inference_mode():
        logits = torch.nn.functional.interpolate(net(inputs), size=(HEIGHT, WIDTH), mode="bilinear")
    ref = logits.argmax(1).numpy()
    assert got.shape == (3, HEIGHT, WIDTH) and got.dtype == np.uint8
    assert (got == ref).mean() >= 0.999
    assert len(np.unique(ref)) >= 3  # varied labels: the comparison means something


def test_metadata(logits_model):
    props = {p.key: p.value for p in onnx.load(logits_model, load_external_data=False).metadata_props}
    assert json.loads(props["mean"]) == [123.675, 116.28, 103.53]
    assert json.loads(props["std"]) == [58.395, 57.12, 57.375]
    assert json.loads(props["input_size"]) == [HEIGHT, WIDTH]
    assert props["arch"] == "bisenetv1_r18" and props["outputs"] == "logits"
    assert len(json.loads(props["classes"])) == 19


def test_help_documents_graph(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "logits" in text and "labels" in text and "dynamic" in text and "normalised" in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--output", "x.onnx", "--outputs", "probabilities"])
