"""The fusion model: architecture, presets, tensor contract, preprocessing and checkpoints."""
