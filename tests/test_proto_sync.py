"""The committed stubs in service/proto are what `make proto` generates from proto/*.proto."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lines stamped with the generator's version: a newer grpcio-tools must not fail the check by itself.
VERSION_STAMPS = [
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: X"),
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M), "GRPC_GENERATED_VERSION = X"),
    (re.compile(r"ValidateProtobufRuntimeVersion\([^)]*\)", re.S), "ValidateProtobufRuntimeVersion(X)"),
]


def normalise(text: str) -> str:
    for pattern, replacement in VERSION_STAMPS:
        text = pattern.sub(replacement, text)
    return text


def load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    generator = load_generator()
    for fresh in generator.generate(tmp_path):
        committed = ROOT / "service" / "proto" / fresh.name
        assert committed.exists(), f"{committed} is missing: run `make proto`"
        assert normalise(committed.read_text()) == normalise(fresh.read_text()), (
            f"{committed.relative_to(ROOT)} is out of date with proto/*.proto: run `make proto`"
        )


def test_stubs_import_as_a_package():
    from service.proto import segmentation_pb2, segmentation_pb2_grpc

    assert segmentation_pb2.DESCRIPTOR.package == "bisenet.v1"
    assert {m.name for m in segmentation_pb2.DESCRIPTOR.services_by_name["Segmentation"].methods} == {
        "Segment",
        "StreamSegment",
        "ListModels",
    }
    assert segmentation_pb2_grpc.segmentation__pb2 is segmentation_pb2


def test_v2_stubs_live_in_their_own_descriptor_pool():
    from google.protobuf import descriptor_pool

    from service.proto import inference_pb2, inference_pb2_grpc

    assert inference_pb2.DESCRIPTOR.package == "inference"
    assert inference_pb2.DESCRIPTOR.pool is inference_pb2.POOL
    assert inference_pb2.DESCRIPTOR.pool is not descriptor_pool.Default()
    assert inference_pb2_grpc.inference__pb2 is inference_pb2
