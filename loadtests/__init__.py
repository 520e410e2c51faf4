"""Load generators, the naive baseline and the benchmark runner (see loadtests/README.md)."""
