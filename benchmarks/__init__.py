"""Benchmark scripts; run each from the repository root as ``python -m benchmarks.bench_<name>``."""
