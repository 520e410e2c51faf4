"""Narrow error classes of the export pipeline; each message names the fix."""

from __future__ import annotations

from typing import Any


class ExportError(Exception):
    """Base error of every export stage."""


class OnnxExportError(ExportError):
    """Stage 1: an exported graph is invalid or does not match `io_spec`."""


class ParityError(ExportError):
    """Stage 2/3: an engine's output differs from its reference by more than the tolerance.

    Attributes:
        engine: the engine whose output failed (`image_encoder`, `text_encoder`, `fusion`).
        output: the output tensor name (`IMAGE_FEATURES`, ...).
        figures: every figure measured before the failure was raised (for the report).
    """

    def __init__(self, message: str, *, engine: str, output: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.engine = engine
        self.output = output
        self.figures = figures or {}


class EngineUnavailable(ExportError):
    """Stage 3 cannot run here (no TensorRT, no CUDA GPU): a SKIP with its reason, not a failure."""


class EngineBuildError(ExportError):
    """Stage 3: TensorRT could not parse the ONNX graph or build a plan."""


class RenderError(ExportError):
    """A model repository's config.pbtxt cannot be rendered for a target or preset."""


class InstallError(ExportError):
    """Stage 4: artefacts are missing or inconsistent, so nothing can be installed."""
