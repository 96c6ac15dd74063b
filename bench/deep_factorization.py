"""Deep matrix factorisation and completion on the CPU: the setting in which the Deep LoRA paper
(Yaras et al., ICML 2024, section 2 and 3) proves and measures compressible dynamics.

Fit ``X = W_L ... W_1`` to a rank-k target ``Phi`` (m, n) by plain gradient descent on
``1/2 ||M * (X - Phi)||_F^2`` (``M`` a 0/1 observation mask; all ones is factorisation), from
three initialisations:

* **full width**: every factor ``eps`` times an orthogonal matrix, width ``d = max(m, n)``; the
  paper's eq. (1)-(3).
* **compressed**: the rank-r compression of that full-width run (section 2.3, eq. (9)), built by
  :func:`pefttriton.adapters.deep_lora.compression_bases` from the gradient at initialisation and the
  full-width product's direction ``E``: fixed outer bases ``U`` (m, r), ``V`` (n, r) around
  ``L`` inner (r, r) factors started at ``eps * I``; or the three-factor form of
  :class:`pefttriton.adapters.deep_lora.FusedDeepLoRALinear` (``W1 = eps V^T, W2 = eps I, W3 = eps U``,
  outer factors trainable).
* **random narrow**: width ``r`` factors, each ``eps`` times an independent orthogonal matrix
  (appendix D, "Random").

Proposition 2.2: the compressed run's end-to-end product stays within
``sqrt(d - r) * eps^L`` of the full-width one (Frobenius) at every step; the random narrow one
of the same width does not track it. :func:`trajectory_experiment` measures both;
:func:`low_rank_bias_experiment` measures the numerical rank of the learned update in matrix
completion. Everything here is float64 and small (d = 30..60, a few hundred steps), for tests and
for ``python -m bench.deep_lora_dmf``.
"""

import math

import torch

from pefttriton.adapters.deep_lora import compression_bases, random_partial_isometry

DTYPE = torch.float64


def orthogonal(rows: int, cols: int, scale: float = 1.0, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``scale`` times a Haar random (rows, cols) matrix with orthonormal rows or columns, float64."""
    return scale * random_partial_isometry(rows, cols, generator=generator)


def end_to_end(factors: list[torch.Tensor]) -> torch.Tensor:
    """``W_L @ ... @ W_1`` for ``factors = [W_1, ..., W_L]`` (first applied first)."""
    product = factors[0]
    for factor in factors[1:]:
        product = factor @ product
    return product


def low_rank_target(
    m: int,
    n: int,
    k: int,
    singular_values: tuple[float, ...] | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``Phi = U diag(s) V^T`` (m, n) of rank k with Haar random U, V; s defaults to k, k-1, ..., 1."""
    s = torch.tensor(singular_values if singular_values is not None else [float(k - i) for i in range(k)], dtype=DTYPE)
    if s.numel() != k:
        raise ValueError(f"singular_values must have k={k} entries, got {s.numel()}")
    U = random_partial_isometry(m, k, generator=generator)
    V = random_partial_isometry(n, k, generator=generator)
    return (U * s) @ V.T


def full_width_factors(
    E: torch.Tensor, depth: int, eps: float, *, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Factors ``[W_1, ..., W_L]`` of width ``d = max(m, n)``, each ``eps`` times an orthogonal
    matrix (orthonormal rows or columns), random but with product exactly ``eps^L * E``.

    ``E`` (m, n) must have orthonormal rows or columns. All factors but one are independent
    draws; the one on the narrow side absorbs ``E``: ``W_L = eps E (Q_{L-1} ... Q_1)^T`` when
    m <= n, ``W_1 = eps (Q_L ... Q_2)^T E`` when m > n.
    """
    if depth < 2:
        raise ValueError(f"depth must be >= 2, got {depth}")
    m, n = E.shape
    d = max(m, n)
    if m <= n:
        inner = [orthogonal(d, n, generator=generator)] + [orthogonal(d, d, generator=generator) for _ in range(depth - 2)]
        last = E @ end_to_end(inner).T  # (m, d): E (prod)^T, orthonormal rows since prod is orthogonal
        return [eps * f for f in inner] + [eps * last]
    outer = [orthogonal(d, d, generator=generator) for _ in range(depth - 2)] + [orthogonal(m, d, generator=generator)]
    first = end_to_end(outer).T @ E  # (d, n): orthonormal columns
    return [eps * first] + [eps * f for f in outer]


def narrow_factors(
    m: int, n: int, width: int, depth: int, eps: float, *, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """``[W_1 (width, n), W_2 .. (width, width), W_L (m, width)]``, each eps times an independent
    orthogonal matrix: the paper's "Random" narrow factorisation."""
    shapes = [(width, n)] + [(width, width)] * (depth - 2) + [(m, width)]
    return [orthogonal(rows, cols, eps, generator=generator) for rows, cols in shapes]


def loss_gradient(X: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``d/dX 1/2 ||M * (X - Phi)||_F^2 = M * (X - Phi)``."""
    residual = X - target
    return residual if mask is None else mask * residual


def compressed_factors(
    target: torch.Tensor,
    E: torch.Tensor,
    r: int,
    depth: int,
    eps: float,
    *,
    mask: torch.Tensor | None = None,
    form: str = "fixed",
) -> list[torch.Tensor]:
    """The rank-r compression of the full-width run started at ``eps^L E``.

    The subspaces come from the gradient at that initialisation, ``M * (eps^L E - Phi)``.

    Args:
        form: ``"fixed"``: eq. (9)/(11), ``[V^T, eps I, ..., eps I, U]`` (L + 2 factors, outer
            ones meant to be frozen or slow); ``"merged"``: the FusedDeepLoRALinear form
            ``[eps V^T, eps I, ..., eps I, eps U]`` (L factors).
    """
    grad = loss_gradient(eps**depth * E, target, mask)
    U, V = compression_bases(grad, E, r)
    eye = torch.eye(r, dtype=DTYPE)
    if form == "fixed":
        return [V.T.contiguous()] + [eps * eye for _ in range(depth)] + [U]
    if form == "merged":
        return [eps * V.T.contiguous()] + [eps * eye for _ in range(depth - 2)] + [eps * U]
    raise ValueError(f"form must be 'fixed' or 'merged', got {form!r}")


def run_gd(
    factors: list[torch.Tensor],
    target: torch.Tensor,
    *,
    lr: float,
    steps: int,
    lr_scales: list[float] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient descent on ``1/2 ||M * (W_L ... W_1 - Phi)||_F^2``; returns the end-to-end
    products at steps 0..steps, shape (steps + 1, m, n). Factor l moves at ``lr * lr_scales[l]``
    (0 freezes it). The input factors are not modified."""
    Ws = [f.detach().clone().to(DTYPE) for f in factors]
    scales = [1.0] * len(Ws) if lr_scales is None else list(lr_scales)
    if len(scales) != len(Ws):
        raise ValueError(f"lr_scales must have one entry per factor ({len(Ws)}), got {len(scales)}")
    trajectory = torch.empty(steps + 1, *target.shape, dtype=DTYPE)
    for step in range(steps + 1):
        # prefix[l] = W_l ... W_1 (prefix[0] = I), suffix[l] = W_L ... W_{l+1} (suffix[L] = I)
        prefix = [torch.eye(Ws[0].shape[1], dtype=DTYPE)]
        for W in Ws:
            prefix.append(W @ prefix[-1])
        trajectory[step] = prefix[-1]
        if step == steps:
            break
        g = loss_gradient(prefix[-1], target, mask)
        suffix = torch.eye(target.shape[0], dtype=DTYPE)
        for idx in range(len(Ws) - 1, -1, -1):
            grad = suffix.T @ g @ prefix[idx].T  # dL/dW_l = (W_L..W_{l+1})^T G (W_{l-1}..W_1)^T
            suffix = suffix @ Ws[idx]  # uses W_l before its update
            if scales[idx]:
                Ws[idx] = Ws[idx] - lr * scales[idx] * grad
    return trajectory


def relative_gaps(trajectory: torch.Tensor, reference: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||X_t - X_ref_t||_F / ||Phi||_F`` per step."""
    return torch.linalg.matrix_norm(trajectory - reference) / torch.linalg.matrix_norm(target)


def numerical_rank(M: torch.Tensor, rtol: float = 1e-2) -> int:
    """Number of singular values above ``rtol`` times the largest (0 for a zero matrix)."""
    s = torch.linalg.svdvals(M.to(DTYPE))
    if s.numel() == 0 or s[0] == 0:
        return 0
    return int((s > rtol * s[0]).sum())


def trajectory_experiment(
    d: int = 40,
    k: int = 3,
    depth: int = 3,
    eps: float = 0.05,
    lr: float = 0.1,
    steps: int = 400,
    seed: int = 0,
) -> dict:
    """Proposition 2.2 on a d x d rank-k target, compressed width r = 2k (the paper's ``2r``).

    Defaults: target singular values 3, 2, 1; ``eps = 0.05`` rather than the paper's smaller
    scales so that the full-width run has learnt all k directions within 400 steps (from scale
    eps the saddle escape of direction i takes about ``1 / (eps * lr * s_i)`` steps; measured at
    d = 40: relative error 2e-4 at step 300); lr = 0.1 is below ``2 / (L s_1^(2 - 2/L))``, the
    stability limit at the solution.

    Returns a dict with the per-step relative gaps to the full-width run of the compressed run
    (``gap_compressed``, eq. (9)), the three-factor FusedDeepLoRALinear form trained with plain GD
    (``gap_merged``, depth must be 3 for it to be Deep LoRA, other depths work the same way) and
    the random narrow run of width r (``gap_narrow``), the Prop. 2.2 bound
    ``sqrt(d - r) eps^L / ||Phi||_F`` (``bound``), the final relative errors to the target
    (``final_error_*``) and the trajectories themselves (``trajectories``).
    """
    gen = torch.Generator().manual_seed(seed)
    r = 2 * k
    target = low_rank_target(d, d, k, generator=gen)
    E = random_partial_isometry(d, d, generator=gen)
    runs = {
        "full": (full_width_factors(E, depth, eps, generator=gen), None),
        "compressed": (compressed_factors(target, E, r, depth, eps), [0.0] + [1.0] * depth + [0.0]),
        "merged": (compressed_factors(target, E, r, depth, eps, form="merged"), None),
        "narrow": (narrow_factors(d, d, r, depth, eps, generator=gen), None),
    }
    trajectories = {
        name: run_gd(factors, target, lr=lr, steps=steps, lr_scales=scales) for name, (factors, scales) in runs.items()
    }
    norm = torch.linalg.matrix_norm(target)
    out = {
        "d": d, "k": k, "r": r, "depth": depth, "eps": eps, "lr": lr, "steps": steps, "seed": seed,
        "bound": math.sqrt(d - r) * eps**depth / norm.item(),
        "trajectories": trajectories,
        "target": target,
    }
    for name in ("compressed", "merged", "narrow"):
        out[f"gap_{name}"] = relative_gaps(trajectories[name], trajectories["full"], target)
    for name, traj in trajectories.items():
        out[f"final_error_{name}"] = (torch.linalg.matrix_norm(traj[-1] - target) / norm).item()
    return out


def low_rank_bias_experiment(
    d: int = 40,
    k: int = 3,
    observed: float = 0.3,
    eps: float = 0.1,
    lr: float = 0.3,
    steps: int = 2000,
    r: int = 8,
    gamma: float = 0.1,
    seed: int = 0,
    rtol: float = 1e-2,
) -> dict:
    """Numerical rank of the learned update in d x d rank-k matrix completion (a fraction
    ``observed`` of the entries seen), for:

    * ``depth1``: GD on X itself from 0 (converges to the observed entries, zeros elsewhere),
    * ``lora``: depth 2, width r, vanilla LoRA's initialisation (A Gaussian with standard deviation
      1 / sqrt(d) here, B = 0; the paper uses standard deviation 1 with a small learning rate),
    * ``full``: depth 3, full width, orthogonal init of scale eps,
    * ``deep_lora``: depth 3 compressed to width r in the FusedDeepLoRALinear form, outer
      factors at ``gamma * lr`` (section 3's discrepant rate).

    Returns the ranks (``rank_*``), the relative errors on the unobserved entries
    (``heldout_error_*``) and the singular values of every final update (``spectrum_*``).
    """
    gen = torch.Generator().manual_seed(seed)
    target = low_rank_target(d, d, k, generator=gen)
    mask = (torch.rand(d, d, generator=gen, dtype=DTYPE) < observed).to(DTYPE)
    E = random_partial_isometry(d, d, generator=gen)
    runs = {
        "depth1": ([torch.zeros(d, d, dtype=DTYPE)], None),
        "lora": ([torch.randn(r, d, generator=gen, dtype=DTYPE) / math.sqrt(d), torch.zeros(d, r, dtype=DTYPE)], None),
        "full": (full_width_factors(E, 3, eps, generator=gen), None),
        "deep_lora": (compressed_factors(target, E, r, 3, eps, mask=mask, form="merged"), [gamma, 1.0, gamma]),
    }
    unobserved = 1.0 - mask
    out = {"d": d, "k": k, "r": r, "observed": observed, "steps": steps, "rtol": rtol, "seed": seed}
    for name, (factors, scales) in runs.items():
        final = run_gd(factors, target, lr=lr, steps=steps, lr_scales=scales, mask=mask)[-1]
        out[f"rank_{name}"] = numerical_rank(final, rtol)
        out[f"spectrum_{name}"] = torch.linalg.svdvals(final)
        out[f"heldout_error_{name}"] = (
            torch.linalg.matrix_norm(unobserved * (final - target)) / torch.linalg.matrix_norm(unobserved * target)
        ).item()
    return out
