"""Evaluate stage: scoring via the edge backend, metrics, threshold, report; torch-free for benchmarks."""
