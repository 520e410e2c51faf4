"""Triton helpers: launcher, model-config mirror, client wrapper, and Python-backend model bodies."""
