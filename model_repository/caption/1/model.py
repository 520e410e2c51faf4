"""Triton Python model: the decode scheduler (serving/triton/python_models/generate.py)."""

from serving.triton.python_models.generate import GenerateModel as TritonPythonModel  # noqa: F401
