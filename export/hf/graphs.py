"""What a family's export module declares: each engine as a traceable module with its tensor contract."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.families.graphs import EngineGraph, Normalize, Tensor  # noqa: F401 - where the families' modules use them


@dataclass
class ParityCase:
    """Engine inputs with the `transformers` module's own outputs for them (float64 numpy)."""

    role: str
    feed: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    note: str = ""


@dataclass
class UserView:
    """What a user would see of an engine set, for judging int8 against fp32 (a family computes it)."""

    figures: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def family_module(family: str) -> Any:
    """The export module of a family (`export/hf/<family>.py`: `load_model`, `graphs`, `parity_cases`, `judge`)."""
    return importlib.import_module(f"export.hf.{family}")


def to_numpy(t: Any) -> np.ndarray:
    """A torch tensor → float64 numpy (for comparisons)."""
    return t.detach().cpu().numpy().astype(np.float64)

