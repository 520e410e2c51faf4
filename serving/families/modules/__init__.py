"""Each imported family's engines as PyTorch modules over the `transformers` model: one module per family.

`load_model(folder)` loads the checkpoint as transformers does; `graphs(model, config, image)` returns
its engines (`serving.families.graphs.EngineGraph`: module, example inputs, tensor contract). The export
side traces them to ONNX and checks them (`export/hf/<family>.py`); the `torch` target runs them as they
are (`serving/families/torch_engine.py`).
"""
