"""vtfuse runtime: the fusion model, Triton helpers, the Ray Serve API and its client."""

__version__ = "0.1.0"
