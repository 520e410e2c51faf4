"""Text generation for captioning and generative VQA: parameters, logits processors, search, the decode scheduler.

Plain Python and NumPy, no Triton or Ray: `params.py` (what a request sets and the checkpoint's
defaults, resolved as `generate()` does), `logits.py` (repetition penalty, n-gram ban, minimum
length, temperature, top-k, top-p), `search.py` (greedy, sampling and beam search for one
sequence), `engine.py` (the decoder graphs' tensor contract and their ONNX Runtime runner),
`scheduler.py` (iteration-level batching over slots), `detokenize.py` (text and streamed deltas).
"""
