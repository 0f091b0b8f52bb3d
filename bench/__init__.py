"""Benchmarks: runnable scenarios (python -m bench.NAME) measured against baselines."""
