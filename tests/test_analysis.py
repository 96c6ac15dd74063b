"""``pefttriton.tools.analysis`` against independent computations: matrices with known singular values,
subspaces with known principal angles, the textbook arccos formula on QR bases, and sums written
out by hand."""

import math

import pytest
import torch
from torch import nn

from pefttriton.tools import analysis
from pefttriton.adapters.lorma import FusedLoRMALinear


def orthonormal(gen, m, k):
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    return q


def with_singular_values(gen, m, n, sigma):
    """U diag(sigma) V^T with random orthonormal U (m, k), V (n, k)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    k = sigma.numel()
    return orthonormal(gen, m, k) @ torch.diag(sigma) @ orthonormal(gen, n, k).T


# --------------------------------------------------------------------------- numerical rank


@pytest.mark.parametrize("k", [0, 1, 3, 17])
def test_numerical_rank_of_constructed_matrices(gen, k):
    sigma = torch.logspace(0, -6, k) if k else torch.zeros(0)
    a = with_singular_values(gen, 23, 31, sigma) if k else torch.zeros(23, 31, dtype=torch.float64)
    assert analysis.numerical_rank(a) == k


def test_numerical_rank_tolerance_follows_dtype(gen):
    """A singular value at 1e-9 * sigma_max is rank in float64 but noise in float32."""
    a = with_singular_values(gen, 20, 25, [1.0, 0.5, 1e-9])
    assert analysis.numerical_rank(a) == 3
    assert analysis.numerical_rank(a.float()) == 2
    assert analysis.numerical_rank(a, rtol=1e-3) == 2
    assert analysis.numerical_rank(a, rtol=0.6) == 1


# ------------------------------------------------------------------- distance and similarity


def test_frobenius_distance_against_explicit_sum(gen):
    a = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    explicit = math.sqrt(sum((a[i, j].item() - b[i, j].item()) ** 2 for i in range(7) for j in range(5)))
    assert abs(analysis.frobenius_distance(a, b) - explicit) < 1e-13 * explicit
    norm_b = math.sqrt(sum(v.item() ** 2 for v in b.flatten()))
    assert abs(analysis.frobenius_distance(a, b, relative=True) - explicit / norm_b) < 1e-13
    assert analysis.frobenius_distance(a, a) == 0.0
    assert analysis.frobenius_distance(a.float(), b.float()) == pytest.approx(explicit, rel=1e-6)


def test_cosine_similarity_known_angles(gen):
    """b = cos(t) a_hat + sin(t) c_hat with c orthogonal to a: the cosine is cos(t) exactly."""
    a = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    c = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    c = c - (c * a).sum() / (a * a).sum() * a  # Frobenius-orthogonal to a
    a_hat, c_hat = a / a.norm(), c / c.norm()
    for t in (0.0, 0.3, math.pi / 2, 2.0, math.pi):
        b = 3.7 * (math.cos(t) * a_hat + math.sin(t) * c_hat)
        assert abs(analysis.cosine_similarity(a, b) - math.cos(t)) < 1e-14
    with pytest.raises(ValueError, match="zero matrix"):
        analysis.cosine_similarity(a, torch.zeros_like(a))


# ----------------------------------------------------------------------- principal angles


def test_principal_angles_identical_and_orthogonal(gen):
    m = 30
    q = orthonormal(gen, m, 8)
    a = q[:, :4] @ torch.randn(4, 6, generator=gen, dtype=torch.float64)  # rank 4, column space q[:, :4]
    b = q[:, :4] @ torch.randn(4, 9, generator=gen, dtype=torch.float64)
    assert torch.allclose(analysis.principal_angles(a, b), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    c = q[:, 4:] @ torch.randn(4, 5, generator=gen, dtype=torch.float64)  # orthogonal column space
    right = torch.full((4,), math.pi / 2, dtype=torch.float64)
    assert torch.allclose(analysis.principal_angles(a, c), right, atol=1e-12)


def test_principal_angles_known_pair(gen):
    """span(e1, e2) vs span(e1, cos(t) e2 + sin(t) e3), rotated at random: angles (0, t)."""
    m = 12
    rot = orthonormal(gen, m, m)
    for t in (1e-9, 1e-4, 0.4, math.pi / 4, 1.2, math.pi / 2):
        e = torch.eye(m, dtype=torch.float64)
        a = rot @ e[:, :2]
        b = rot @ torch.stack([e[:, 0], math.cos(t) * e[:, 1] + math.sin(t) * e[:, 2]], dim=1)
        angles = analysis.principal_angles(a, b)
        assert angles.dtype == torch.float64
        assert abs(angles[0].item()) < 1e-14
        # small angles keep their relative accuracy (the sine branch); arccos alone gives ~1e-8 absolute
        assert abs(angles[1].item() - t) < 1e-13 * max(t, 1e-3)


def test_principal_angles_against_textbook_formula(gen):
    """Random pair: arccos of the singular values of Qa^T Qb with Householder-QR bases
    (Bjorck & Golub); the angles here are all far from 0, where arccos is accurate."""
    a = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    expected = torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)).sort().values
    assert expected.min() > 0.1
    ours = analysis.principal_angles(a, b)
    assert ours.shape == (5,)
    assert torch.allclose(ours, expected, atol=1e-12)
    assert torch.allclose(analysis.principal_angles(b, a), expected, atol=1e-12)


def test_principal_angles_top_k_subspaces(gen):
    """With k, the spaces are the top-k left singular subspaces (full-rank matrices share all of R^m)."""
    m, n = 10, 15
    U = orthonormal(gen, m, m)
    V1, V2 = orthonormal(gen, n, m), orthonormal(gen, n, m)
    sig = torch.linspace(10, 1, m, dtype=torch.float64)
    a = U @ torch.diag(sig) @ V1.T
    b = U[:, [2, 3, 0, 1, 4, 5, 6, 7, 8, 9]] @ torch.diag(sig) @ V2.T  # top-2 directions swapped with 3rd/4th
    assert torch.allclose(analysis.principal_angles(a, b), torch.zeros(m, dtype=torch.float64), atol=1e-7)
    right = torch.full((2,), math.pi / 2, dtype=torch.float64)
    assert torch.allclose(analysis.principal_angles(a, b, k=2), right, atol=1e-12)
    assert torch.allclose(analysis.principal_angles(a, b, k=4), torch.zeros(4, dtype=torch.float64), atol=1e-7)


# ------------------------------------------------------------------ singular value difference


def test_top_k_singular_value_difference(gen):
    a = with_singular_values(gen, 9, 13, [5.0, 3.0, 2.0, 0.5])
    b = with_singular_values(gen, 9, 13, [4.0, 3.5, 1.0])
    # (5 - 4)^2 + (3 - 3.5)^2 = 1.25; with k = 3 also (2 - 1)^2; with k = 4 also (0.5 - 0)^2
    assert analysis.top_k_singular_value_difference(a, b, 2) == pytest.approx(1.25, abs=1e-12)
    assert analysis.top_k_singular_value_difference(a, b, 3) == pytest.approx(2.25, abs=1e-12)
    assert analysis.top_k_singular_value_difference(a, b, 4) == pytest.approx(2.5, abs=1e-12)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 9\]"):
        analysis.top_k_singular_value_difference(a, b, 10)


# --------------------------------------------------------------------------- delta_weight


def test_delta_weight_of_a_layer(gen):
    base = nn.Linear(11, 7).double()
    layer = FusedLoRMALinear(base, 2, variant="plus")
    with torch.no_grad():
        layer.lorma_A.copy_(torch.randn(2, 7, generator=gen, dtype=torch.float64))
    expected = layer.scale * layer.lorma_B @ layer.lorma_A @ base.weight  # s B A W0
    dw = analysis.delta_weight(layer)
    assert not dw.requires_grad
    assert torch.allclose(dw, expected.detach(), rtol=1e-13, atol=0)
    assert analysis.numerical_rank(dw) == 2
    with pytest.raises(TypeError, match="delta_weight"):
        analysis.delta_weight(base)


def test_validation_messages():
    a = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="same shape"):
        analysis.frobenius_distance(a, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="2-D"):
        analysis.numerical_rank(torch.zeros(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        analysis.cosine_similarity([[1.0]], a)
    with pytest.raises(TypeError, match="floating-point"):
        analysis.numerical_rank(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="same number of rows"):
        analysis.principal_angles(torch.ones(3, 2), torch.ones(4, 2))
