"""Benchmark scripts, not installed: run each from the repository root as ``python -m benchmarks.NAME``
(``benchmarks/protocol.py`` is the protocol they share)."""
