"""The committed gRPC code is what grpcio-tools generates from serving/proto/vtfuse.proto."""

from __future__ import annotations

import pytest

from serving.model.checkpoint import REPO_ROOT


def test_generated_code_is_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    from serving.proto.__main__ import generate

    assert generate(tmp_path) == 0
    for name in ("vtfuse_pb2.py", "vtfuse_pb2_grpc.py", "vtfuse_pb2.pyi"):
        fresh = (tmp_path / "serving" / "proto" / name).read_text()
        committed = (REPO_ROOT / "serving" / "proto" / name).read_text()
        assert fresh == committed, f"serving/proto/{name} is stale: run `python -m serving.proto`"


def test_service_has_the_task_calls_list_models_and_captions():
    from serving.proto import vtfuse_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Vtfuse"]
    assert [m.name for m in service.methods] == [
        "Vqa", "Match", "Retrieve", "Embed", "ListModels", "Caption", "CaptionStream"
    ]
    stream = service.methods_by_name["CaptionStream"]
    assert stream.server_streaming and not stream.client_streaming
    assert stream.output_type.name == "CaptionEvent"
    assert not service.methods_by_name["Caption"].server_streaming
    listing = service.methods_by_name["ListModels"]
    assert listing.output_type.name == "ListModelsResponse"
    info = pb.ModelInfo(name="blip-base", family="blip_retrieval", tasks=["match", "retrieve", "embed"])
    info.engines["fusion"] = "blip-base_fusion"
    assert pb.ModelInfo.FromString(info.SerializeToString()) == info
