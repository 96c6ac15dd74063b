"""Deep matrix factorisation / completion (bench.deep_factorization): the paper's Prop. 2.2
and low-rank bias, reproduced on the CPU in float64.

Every bound below is stated with the value measured on this machine (torch 2.13 CPU, float64,
fixed seeds), and chosen with margin but so that the claim would fail without the effect.
"""

import pytest
import torch

from bench.deep_factorization import (
    compressed_factors,
    full_width_factors,
    low_rank_bias_experiment,
    low_rank_target,
    narrow_factors,
    numerical_rank,
    run_gd,
    trajectory_experiment,
)
from pefttriton.adapters.deep_lora import random_partial_isometry


def _is_scaled_partial_isometry(W, scale, tol=1e-12):
    rows, cols = W.shape
    Q = W / scale
    gram = Q @ Q.T if rows <= cols else Q.T @ Q
    return (gram - torch.eye(min(rows, cols), dtype=W.dtype)).abs().max().item() < tol


@pytest.mark.parametrize("m,n", [(31, 31), (23, 41), (41, 23)])
@pytest.mark.parametrize("depth", [2, 3, 4])
def test_full_width_factors(m, n, depth):
    """Each factor is eps times an orthogonal matrix of width max(m, n); the product is eps^L E."""
    gen = torch.Generator().manual_seed(3)
    E = random_partial_isometry(m, n, generator=gen)
    assert _is_scaled_partial_isometry(E, 1.0)
    eps = 0.3
    factors = full_width_factors(E, depth, eps, generator=gen)
    d = max(m, n)
    assert factors[0].shape == (d, n) and factors[-1].shape == (m, d)
    assert all(f.shape == (d, d) for f in factors[1:-1])
    assert all(_is_scaled_partial_isometry(f, eps) for f in factors)
    product = factors[-1]
    for f in reversed(factors[:-1]):
        product = product @ f
    assert (product - eps**depth * E).abs().max().item() < 1e-14


def test_narrow_factors_and_target():
    gen = torch.Generator().manual_seed(4)
    factors = narrow_factors(33, 29, 5, 3, 0.2, generator=gen)
    assert [tuple(f.shape) for f in factors] == [(5, 29), (5, 5), (33, 5)]
    assert all(_is_scaled_partial_isometry(f, 0.2) for f in factors)
    target = low_rank_target(33, 29, 3, generator=gen)
    s = torch.linalg.svdvals(target)
    assert torch.allclose(s[:3], torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), atol=1e-12)
    assert s[3:].max() < 1e-12


def test_run_gd_steps_match_autograd():
    """Two GD steps of run_gd, against the same steps with gradients from autograd."""
    gen = torch.Generator().manual_seed(5)
    factors = [torch.randn(4, 7, generator=gen, dtype=torch.float64),
               torch.randn(4, 4, generator=gen, dtype=torch.float64),
               torch.randn(6, 4, generator=gen, dtype=torch.float64)]
    target = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    mask = (torch.rand(6, 7, generator=gen) < 0.5).double()
    lr, scales = 0.01, [0.5, 1.0, 0.0]
    traj = run_gd(factors, target, lr=lr, steps=2, lr_scales=scales, mask=mask)
    Ws = [f.clone().requires_grad_(True) for f in factors]
    for step in range(3):
        X = Ws[2] @ Ws[1] @ Ws[0]
        assert (traj[step] - X).abs().max().item() < 1e-12
        loss = 0.5 * (mask * (X - target)).pow(2).sum()
        grads = torch.autograd.grad(loss, Ws)
        Ws = [(W - lr * s * g).detach().requires_grad_(True) for W, g, s in zip(Ws, grads, scales)]
    assert torch.equal(Ws[2], factors[2])  # lr_scale 0 froze the last factor


def test_numerical_rank():
    M = torch.diag(torch.tensor([5.0, 1.0, 0.06, 0.01], dtype=torch.float64))
    assert numerical_rank(M, rtol=1e-2) == 3  # threshold 0.05
    assert numerical_rank(M, rtol=1e-3) == 4  # threshold 0.005
    assert numerical_rank(torch.zeros(3, 3)) == 0


def test_compression_subspace_contains_the_target_spaces():
    """For factorisation the invariant subspace of Theorem 2.1 holds col(Phi) on the out side and
    row(Phi) on the in side (so gradients never leave it)."""
    gen = torch.Generator().manual_seed(6)
    d, k, eps = 40, 3, 0.05
    target = low_rank_target(d, d, k, generator=gen)
    E = random_partial_isometry(d, d, generator=gen)
    V_T, *_, U = compressed_factors(target, E, 2 * k, 3, eps)
    P_out, P_in = U @ U.T, V_T.T @ V_T
    assert (P_out @ target - target).abs().max().item() < 1e-12
    assert (target @ P_in - target).abs().max().item() < 1e-12


@pytest.mark.parametrize("d,seed", [(30, 0), (40, 0), (60, 1)])
def test_prop22_compressed_tracks_full_width_random_narrow_does_not(d, seed):
    out = trajectory_experiment(d=d, k=3, depth=3, eps=0.05, lr=0.1, steps=400, seed=seed)
    gap_c, gap_m, gap_n, bound = out["gap_compressed"], out["gap_merged"], out["gap_narrow"], out["bound"]
    assert gap_c.shape == (401,)
    # Prop. 2.2: ||X_full(t) - X_comp(t)||_F <= sqrt(d - r) eps^L for every t. Measured: equal
    # to the bound at t = 0 (the (d - r)-dimensional part the compression leaves out, exactly
    # eps^L on each of its directions) and non-increasing after (those singular values only
    # shrink): d=40: 1.948e-4 relative to ||Phi||_F at every step.
    assert gap_c.max().item() <= bound * (1 + 1e-9)
    assert gap_c[0].item() == pytest.approx(bound, rel=1e-9)
    assert bool((gap_c[1:] <= gap_c[:-1] * (1 + 1e-9)).all())
    # The FusedDeepLoRALinear three-factor form (outer factors trained) follows the same trajectory
    # under plain GD (measured difference ~3e-15).
    assert (out["trajectories"]["merged"] - out["trajectories"]["compressed"]).abs().max().item() < 1e-11
    assert gap_m.max().item() <= bound * (1 + 1e-9)
    # The random narrow factorisation of the same width: measured max relative gaps 0.81 (d=30),
    # 0.81 (d=40), 0.96 (d=60), i.e. about 4000 times the compressed gap.
    assert gap_n.max().item() > 0.5
    assert gap_n.max().item() > 1000 * gap_c.max().item()
    # Both the full-width and the compressed runs have learnt the target (measured 2e-4 / 3e-5).
    assert out["final_error_full"] < 1e-3
    assert out["final_error_compressed"] < 1e-3


def test_low_rank_bias_in_matrix_completion():
    """40 x 40 rank-3 target, 30% of entries seen, 2000 GD steps. Measured ranks (singular values
    above 1e-2 of the largest): depth 1: 38, LoRA (depth 2, width 8): 8 (saturated, 8th singular
    value 0.31 of 2.55), full-width depth 3: 3 (4th value 0.021 of 2.97), Deep LoRA (width 8,
    gamma 0.1): 3 (4th 0.018 of 2.99). Held-out relative errors: 1.0, 0.63, 0.030, 0.018."""
    out = low_rank_bias_experiment(d=40, k=3, observed=0.3, steps=2000, r=8, gamma=0.1, seed=0)
    assert out["rank_depth1"] >= 30
    assert out["rank_lora"] == 8
    assert out["rank_full"] == 3
    assert out["rank_deep_lora"] == 3
    assert out["heldout_error_deep_lora"] < 0.05
    assert out["heldout_error_full"] < 0.06
    assert out["heldout_error_lora"] > 0.3
    assert out["heldout_error_depth1"] > 0.99  # GD on X never touches an unobserved entry


def test_compressed_factors_rejects_unknown_form():
    E = random_partial_isometry(6, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="form"):
        compressed_factors(torch.eye(6, dtype=torch.float64), E, 2, 3, 0.1, form="wide")
