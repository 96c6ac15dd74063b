"""Benchmarks of pefttriton: `python -m bench` (the main job) and `pytest --benchmark-only`."""
