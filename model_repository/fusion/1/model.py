"""Triton Python model `fusion`: an exported ONNX engine run by ONNX Runtime (see serving/triton/python_models/engine.py)."""

from serving.triton.python_models.engine import OnnxEngineModel as TritonPythonModel  # noqa: F401
