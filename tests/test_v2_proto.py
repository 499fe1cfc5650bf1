"""proto/inference.proto against the published protocol: every service, method, message, field name,
number, type and label it defines is the same in tritonclient's compiled grpc_service.proto and
model_config.proto (what Triton and every v2 gRPC client use), so the two interoperate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

ROOT = Path(__file__).resolve().parent.parent
service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


@pytest.fixture(scope="module")
def ours() -> descriptor_pool.DescriptorPool:
    """Our proto compiled by protoc into a pool of its own (it shares names with tritonclient's)."""
    protoc = pytest.importorskip("grpc_tools.protoc")
    out = ROOT / ".pytest_cache" / "inference.desc"
    out.parent.mkdir(exist_ok=True)
    assert protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--descriptor_set_out={out}", "inference.proto"]) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


def our_messages(pool) -> list:
    file = pool.FindFileByName("inference.proto")
    found = []

    def walk(message):
        found.append(message)
        for nested in message.nested_types:
            walk(nested)

    for message in file.message_types_by_name.values():
        walk(message)
    return found


def test_package_service_and_methods(ours):
    file = ours.FindFileByName("inference.proto")
    assert file.package == "inference"
    mine = file.services_by_name["GRPCInferenceService"]
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert mine.full_name == theirs.full_name == "inference.GRPCInferenceService"
    wanted = {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelConfig",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelStatistics",
        "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
        "LogSettings",
    }
    assert set(mine.methods_by_name) == wanted
    for name in wanted:
        a, b = mine.methods_by_name[name], theirs.methods_by_name[name]
        assert a.input_type.full_name == b.input_type.full_name, name
        assert a.output_type.full_name == b.output_type.full_name, name
        assert (a.client_streaming, a.server_streaming) == (b.client_streaming, b.server_streaming), name


def test_every_message_and_field_matches_tritonclient(ours):
    theirs = descriptor_pool.Default()  # holds tritonclient's files after the imports above
    messages = our_messages(ours)
    assert len(messages) >= 25
    for mine in messages:
        reference = theirs.FindMessageTypeByName(mine.full_name)
        for field in mine.fields:
            other = reference.fields_by_name.get(field.name)
            assert other is not None, f"{mine.full_name}.{field.name} is not in the published protocol"
            assert field.number == other.number, (
                f"{mine.full_name}.{field.name}: number {field.number} != {other.number}"
            )
            assert field.type == other.type, f"{mine.full_name}.{field.name}: type differs"
            if field.message_type is not None:
                assert field.message_type.full_name == other.message_type.full_name, field.full_name
            if field.enum_type is not None:
                assert field.enum_type.full_name == other.enum_type.full_name, field.full_name
            assert field.is_repeated == other.is_repeated, f"{field.full_name}: repeated differs"
            mine_oneof = field.containing_oneof.name if field.containing_oneof else None
            their_oneof = other.containing_oneof.name if other.containing_oneof else None
            assert mine_oneof == their_oneof, field.full_name


def test_data_type_enum_matches(ours):
    mine = ours.FindEnumTypeByName("inference.DataType")
    theirs = model_config_pb2.DataType.DESCRIPTOR
    assert {v.name: v.number for v in mine.values} == {v.name: v.number for v in theirs.values}


def test_a_renumbered_field_would_be_caught(ours):
    """The comparison is not vacuous: a message really differs when a number changes."""
    mine = ours.FindMessageTypeByName("inference.ModelInferRequest")
    theirs = service_pb2.ModelInferRequest.DESCRIPTOR
    assert mine.fields_by_name["raw_input_contents"].number == theirs.fields_by_name["raw_input_contents"].number == 7
    assert mine.fields_by_name["inputs"].number != theirs.fields_by_name["raw_input_contents"].number


def test_stubs_and_tritonclient_import_in_one_process():
    """Our stubs use their own descriptor pool: importing them beside tritonclient (same message
    names) must not fail, in either order, and our messages parse tritonclient's bytes."""
    check = """
request = theirs.ModelInferRequest(model_name="m", raw_input_contents=[b"abc"])
request.inputs.add(name="RGB", datatype="UINT8", shape=[1, 1, 1, 3])
mine = ours.ModelInferRequest.FromString(request.SerializeToString())
assert (mine.model_name, list(mine.inputs[0].shape), list(mine.raw_input_contents)) == ("m", [1, 1, 1, 3], [b"abc"])
"""
    theirs_first = "import tritonclient.grpc.service_pb2 as theirs\nfrom service.api import grpc_server\n"
    ours_first = "from service.api import grpc_server\nimport tritonclient.grpc.service_pb2 as theirs\n"
    for imports in (theirs_first, ours_first):
        code = imports + "from service.proto import inference_pb2 as ours\n" + check
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert run.returncode == 0, run.stderr
