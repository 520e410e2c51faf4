"""Importing published Hugging Face checkpoints (`vtfuse import-hf`): one module per family, an importer, parity.

- `source.py`: find the checkpoint (folder or hub id), its family, image processor and tokenizer;
- `blip_retrieval.py`, `vilt_vqa.py`: each family's engine graphs (PyTorch wrappers over the
  `transformers` modules) and its parity cases against the `transformers` forward;
- `parity.py`: the fp32 gate and the int8 judgement;
- `importer.py`: export → parity → (int8) → install into a Triton repository with manifests;
- `cli.py`: the `vtfuse import-hf` command.
"""
