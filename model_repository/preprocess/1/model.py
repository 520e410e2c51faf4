"""Triton Python model `preprocess` (see serving/triton/python_models/preprocess.py)."""

from serving.triton.python_models.preprocess import PreprocessModel as TritonPythonModel  # noqa: F401
