"""Benchmarks: measured ratios, not tests. Each `bench_*.py` module has `run() -> dict` that
prints its own table; `python -m benchmarks` (or `make bench`) runs them all and writes the
figures as JSON under benchmarks/results/."""
