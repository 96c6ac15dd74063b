"""Comparing weight updates: the metrics the LoRMA paper uses to relate two adapters' ``Delta W``.

Plain PyTorch on any (m, n) matrices; every computation runs in float64 whatever the input dtype,
and returns Python floats or float64 tensors. Works with any adapted layer that has a
``delta_weight()`` method (every pefttriton adapter does).

Tolerances (float64 arithmetic, inputs of moderate condition):

* :func:`numerical_rank`: singular values above ``rtol * sigma_max`` count, with the LAPACK / NumPy
  default ``rtol = max(m, n) * eps(dtype)``, where dtype is the input's (a matrix computed in fp32
  carries fp32 noise, so fp64's eps would count noise as rank).
* :func:`frobenius_distance`, :func:`cosine_similarity`: exact up to float64 rounding (~1e-15 relative).
* :func:`principal_angles`: computed from both the cosines and the sines of the angles
  (Knyazev & Argentati), so small angles are accurate to ~1e-15 absolute and angles near pi/2 too;
  arccos of the cosines alone would lose half the digits near 0.
* :func:`top_k_singular_value_difference`: exact up to the SVD's backward error (~1e-15 sigma_max).
"""

import torch
from torch import nn


def delta_weight(layer: nn.Module) -> torch.Tensor:
    """``layer.delta_weight()``, detached: the (out_features, in_features) update of an adapted layer."""
    fn = getattr(layer, "delta_weight", None)
    if not callable(fn):
        raise TypeError(f"layer must have a delta_weight() method (a pefttriton adapter), got {type(layer).__name__}")
    with torch.no_grad():
        return fn().detach()


def _matrix(name: str, a) -> torch.Tensor:
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
    if a.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (m, n) matrix, got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"{name} must be a floating-point matrix, got {a.dtype}")
    return a.detach().to(torch.float64)


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _default_rtol(a: torch.Tensor) -> float:
    return max(a.shape) * torch.finfo(a.dtype).eps


def numerical_rank(a: torch.Tensor, rtol: float | None = None) -> int:
    """Number of singular values of ``a`` (m, n) above ``rtol * sigma_max``.

    ``rtol`` defaults to ``max(m, n) * eps`` of ``a``'s dtype (NumPy's ``matrix_rank``). The zero
    matrix has rank 0.
    """
    a64 = _matrix("a", a)
    rtol = _default_rtol(a) if rtol is None else float(rtol)
    s = torch.linalg.svdvals(a64)
    if s.numel() == 0 or s[0] == 0:
        return 0
    return int((s > rtol * s[0]).sum().item())


def frobenius_distance(a: torch.Tensor, b: torch.Tensor, relative: bool = False) -> float:
    """``||a - b||_F``, or ``||a - b||_F / ||b||_F`` when ``relative``."""
    a64, b64 = _matrix("a", a), _matrix("b", b)
    _same_shape(a64, b64)
    dist = torch.linalg.matrix_norm(a64 - b64).item()
    if relative:
        norm = torch.linalg.matrix_norm(b64).item()
        if norm == 0:
            raise ValueError("b is zero: the relative distance is undefined")
        return dist / norm
    return dist


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the angle between the flattened matrices, ``<a, b>_F / (||a||_F ||b||_F)``."""
    a64, b64 = _matrix("a", a).flatten(), _matrix("b", b).flatten()
    _same_shape(a64, b64)
    na, nb = torch.linalg.vector_norm(a64).item(), torch.linalg.vector_norm(b64).item()
    if na == 0 or nb == 0:
        raise ValueError("cosine similarity is undefined for a zero matrix")
    return max(-1.0, min(1.0, (a64 @ b64).item() / (na * nb)))


def column_basis(a: torch.Tensor, k: int | None = None, rtol: float | None = None) -> torch.Tensor:
    """Orthonormal basis (m, k) of ``a``'s column space: its top-k left singular vectors.

    ``k`` defaults to :func:`numerical_rank` of ``a`` (with ``rtol``), i.e. the whole column space.
    """
    a64 = _matrix("a", a)
    U, s, _ = torch.linalg.svd(a64, full_matrices=False)
    if k is None:
        k = numerical_rank(a, rtol)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= s.numel():
        raise ValueError(f"k must be an int in [0, {s.numel()}], got {k!r}")
    return U[:, :k]


def principal_angles(a: torch.Tensor, b: torch.Tensor, k: int | None = None, rtol: float | None = None) -> torch.Tensor:
    """Principal angles (radians, ascending, float64) between the column spaces of ``a`` and ``b``.

    ``a`` (m, n1) and ``b`` (m, n2) need the same number of rows. With ``k``, each space is its
    top-k left singular subspace (the usual choice for full-rank updates, whose whole column spaces
    coincide); otherwise its numerical column space. Returns ``min(k_a, k_b)`` angles.
    """
    a64, b64 = _matrix("a", a), _matrix("b", b)
    if a64.shape[0] != b64.shape[0]:
        raise ValueError(f"a and b must have the same number of rows, got {a64.shape[0]} and {b64.shape[0]}")
    Qa, Qb = column_basis(a, k, rtol), column_basis(b, k, rtol)
    if Qa.shape[1] < Qb.shape[1]:
        Qa, Qb = Qb, Qa  # Qa spans the larger space
    q = Qb.shape[1]
    if q == 0:
        return torch.zeros(0, dtype=torch.float64)
    # Both lists ordered by ascending angle: cosines descending, sines ascending (q values each).
    cos = torch.linalg.svdvals(Qa.T @ Qb).clamp(0.0, 1.0)
    sin = torch.linalg.svdvals(Qb - Qa @ (Qa.T @ Qb)).clamp(0.0, 1.0).flip(0)
    # arcsin is accurate for angles below pi/4, arccos above.
    return torch.where(cos**2 >= 0.5, torch.arcsin(sin), torch.arccos(cos))


def top_k_singular_value_difference(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """``sum_{i < k} (sigma_i(a) - sigma_i(b))^2`` over the k largest singular values of each."""
    a64, b64 = _matrix("a", a), _matrix("b", b)
    sa, sb = torch.linalg.svdvals(a64), torch.linalg.svdvals(b64)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(sa.numel(), sb.numel()):
        raise ValueError(f"k must be an int in [1, {min(sa.numel(), sb.numel())}], got {k!r}")
    return float(((sa[:k] - sb[:k]) ** 2).sum().item())


__all__ = [
    "column_basis",
    "cosine_similarity",
    "delta_weight",
    "frobenius_distance",
    "numerical_rank",
    "principal_angles",
    "top_k_singular_value_difference",
]
