"""The naive baseline: FastAPI + PyTorch eager, one request per forward pass, one uvicorn worker per core."""
