"""Typed access to Triton `config.pbtxt` files, parsed with Triton's own ModelConfig protobuf."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serving.model.io_spec import EngineSpec, TensorSpec

ModelConfig = mc.ModelConfig


def load_config(path: str | Path) -> mc.ModelConfig:
    """Parse a config.pbtxt (a model folder or the file itself); unknown fields are an error."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.pbtxt"
    return text_format.Parse(p.read_text(), mc.ModelConfig())


def dump_config(config: mc.ModelConfig) -> str:
    """Serialise a ModelConfig back to pbtxt text."""
    return text_format.MessageToString(config)


def _dtype(value: int) -> str:
    return mc.DataType.Name(value).removeprefix("TYPE_")


def io_of(config: mc.ModelConfig) -> EngineSpec:
    """The inputs and outputs a config declares, as io_spec objects for comparison."""
    return EngineSpec(
        config.name,
        tuple(TensorSpec(t.name, _dtype(t.data_type), tuple(t.dims)) for t in config.input),
        tuple(TensorSpec(t.name, _dtype(t.data_type), tuple(t.dims)) for t in config.output),
    )
