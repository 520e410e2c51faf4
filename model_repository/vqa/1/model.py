"""Triton Python BLS model `vqa` (see serving/triton/python_models/vqa.py)."""

from serving.triton.python_models.vqa import VqaModel as TritonPythonModel  # noqa: F401
