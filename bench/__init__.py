"""Benchmarks of pefttriton: `python -m bench` (the main job) and `pytest --benchmark-only`.

Installed as ``pefttriton.bench`` (setup.py), so ``python -m pefttriton.bench`` runs the main job from
any directory; the modules import each other relatively for that.
"""
