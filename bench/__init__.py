"""Benchmarks of swarm-grid (``python -m bench.run``)."""
