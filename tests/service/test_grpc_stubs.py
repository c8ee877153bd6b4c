"""The committed gRPC stubs are what grpcio-tools makes of the committed .proto, and that .proto
is wire-compatible with what tritonclient.grpc sends.

Neither test imports the stubs: they register `inference.*` in protobuf's default pool, as
tritonclient's do, and the two cannot share a process (service/proto/__init__.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from service.proto import generate
from tests.helpers import ROOT


def test_committed_stubs_are_current(tmp_path: Path) -> None:
    (tmp_path / generate.PROTO).parent.mkdir(parents=True)
    shutil.copy(ROOT / generate.PROTO, tmp_path / generate.PROTO)
    fresh = generate.generate(tmp_path)
    assert len(fresh) == 3
    for path, relative in zip(fresh, generate.GENERATED, strict=True):
        committed = ROOT / relative
        assert committed.exists(), f"{relative} is missing: run `make proto`"
        assert path.read_bytes() == committed.read_bytes(), f"{relative} is stale: run `make proto`"


def _descriptor_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    """Our .proto as protoc parses it, without loading it into any pool."""
    out = tmp_path / "set.pb"
    assert (
        protoc.main(["protoc", f"-I{ROOT}", f"--descriptor_set_out={out}", str(ROOT / generate.PROTO)]) == 0
    )
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    assert len(files) == 1
    return files[0]


def _fields(message: descriptor_pb2.DescriptorProto) -> dict[str, tuple]:
    return {f.name: (f.number, f.type, f.label, f.type_name.rsplit(".", 1)[-1]) for f in message.field}


def _messages(messages, prefix: str = "") -> dict[str, descriptor_pb2.DescriptorProto]:
    out = {}
    for m in messages:
        out[prefix + m.name] = m
        out.update(_messages(m.nested_type, prefix + m.name + "."))
    return out


@pytest.fixture
def triton_file() -> descriptor_pb2.FileDescriptorProto:
    from tritonclient.grpc import service_pb2

    proto = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(proto)
    return proto


def test_the_proto_is_wire_compatible_with_tritonclient(tmp_path: Path, triton_file) -> None:
    ours = _descriptor_set(tmp_path)
    assert ours.package == triton_file.package == "inference"
    (service,) = ours.service
    (triton_service,) = [s for s in triton_file.service if s.name == service.name]
    assert service.name == "GRPCInferenceService"
    triton_methods = {m.name: (m.input_type, m.output_type) for m in triton_service.method}
    for method in service.method:
        assert triton_methods[method.name] == (method.input_type, method.output_type), method.name
    assert len(service.method) == 6
    # Every field both declare has the same number, type and label. A field only one side has is
    # skipped by the other's decoder: Triton's has many more; ours only the one listed here.
    theirs = _messages(triton_file.message_type)
    ours_only = set()
    for name, message in _messages(ours.message_type).items():
        if message.options.map_entry:
            continue
        assert name in theirs, name
        expected = _fields(theirs[name])
        for field, spec in _fields(message).items():
            if field not in expected:
                ours_only.add(f"{name}.{field}")
                continue
            assert expected[field] == spec, f"{name}.{field}: ours {spec}, Triton's {expected[field]}"
    # The Open Inference Protocol's optional model properties, which the server never sets.
    assert ours_only == {"ModelMetadataResponse.properties"}
