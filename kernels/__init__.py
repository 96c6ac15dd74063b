"""Triton kernels of pefttriton, installed as ``pefttriton.kernels``.

Only ``@triton.jit`` code and the plain launchers that size grids live here; autograd
and backend dispatch are in ``pefttriton.ops``.
"""
