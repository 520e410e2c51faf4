"""Where things are in a checkout: the repository root and the shipped checkpoint."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The shipped, trained `tiny` checkpoint: the default everywhere.
DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "tiny"
