"""Export pipeline: train (stage 0) → onnx → check → engine → install, each a CLI subcommand."""
