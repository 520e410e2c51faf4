"""Triton Python model `vtfuse_catalog`: the repository's imported models (see serving/triton/python_models/catalog.py)."""

from serving.triton.python_models.catalog import CatalogModel as TritonPythonModel  # noqa: F401
