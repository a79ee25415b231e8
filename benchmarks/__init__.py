"""Benchmarks (STYLE §6): one script per op, run as ``python -m benchmarks.bench_<op>``."""
