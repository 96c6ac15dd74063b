"""LoRMA: low-rank *multiplicative* adaptation, ``W = T(B, A) @ W0`` with T an (m, m) multiplier.

Three variants of the multiplier, ``s = alpha / r``, ``B`` (m, r), ``A`` (r, m):

* ``"plus"`` (LoRMA+, additive rank inflation): ``T = I + s B A``, so ``W = W0 + s B (A W0)``.
  Computed as the fused engine with ``A_eff = A @ W0`` (r, n) formed each step (``r m n`` FMAs,
  independent of the tokens): no (m, m) nor per-token (m, n) matrix ever exists.
* ``"pi"`` (LoRMA-pi, permutation rank inflation): ``T = s shift(B A)`` with
  ``shift(P)[i, j] = P[i, (j - i) mod m]`` (row i rolled right by i; the authors'
  ``torch.gather(P, 1, (j - i) % m)``). Dense and full rank: see :mod:`pefttriton.ops.lorma_pi`
  for the Triton kernel that forms it and the two GEMM orders it is applied in.
* ``"naive"`` (no rank inflation, the paper's ablation): ``T = s B A``, rank <= r, so the adapted
  weight ``s B (A W0)`` has rank <= r. Computed as two skinny GEMMs, ``bias + s (x A_eff^T) B^T``,
  in plain PyTorch on every backend (the frozen base GEMM disappears altogether).

Initialisation (the authors' code, Exploration-Lab/LoRMA):

* plus: ``A = 0``, ``B`` Kaiming-uniform(a=sqrt(5)): ``T = I`` at init. (The authors' GPT-2 code
  does this; their GLUE/MetaMath ``rri`` code swaps the roles, ``B = 0``, ``A`` Kaiming; both give
  ``T = I``.)
* pi: ``B`` Kaiming-uniform(a=sqrt(5)) with column 0 set to 1, ``A = 0`` but ``A[0, 0] = 1``, both
  divided by ``sqrt(s)``: then ``B A = (1/s) 1 e_0^T`` and ``s shift(B A) = I``.
* naive: ``B`` Kaiming-uniform(a=sqrt(5)), ``A = pinv(B)``, both divided by ``sqrt(s)`` (the authors'
  ``rank_inflation="none"``): ``T = B B^+``, the orthogonal projector onto the columns of ``B``.
  A rank-r multiplier cannot be the identity, so this variant does *not* start at the base layer;
  it starts at ``P_B W0`` (equal to ``W0`` only when ``W0``'s columns lie in ``span(B)``).

The default ``alpha = 16`` is the authors' MetaMathQA default (``lorma_alpha=16`` with ``r=8``);
their GLUE scripts use ``alpha = r``.
"""

import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from pefttriton.adapters.adapter_layer import AdapterLayer, LowRank, check_finite
from pefttriton.ops.validation import check_x_and_weight
from pefttriton.ops.lorma_pi import lorma_pi_linear, pi_extra_macs, pi_order, shift_product

VARIANTS = ("plus", "pi", "naive")
# LoRMA+ unmerges by the Woodbury identity when T = I + s B A is at most this ill-conditioned;
# otherwise merge keeps a copy of W0. Rounding the merged weight to the layer dtype costs about
# cond(T) * eps / 3 relative in the restored W0 (measured in fp32: 6e-7 at cond 81, 1.4e-6 at 49,
# 6.7e-6 at 502), so at cond <= 10 it stays within a few eps. A trained adapter has T close to I.
WOODBURY_MAX_COND = 10.0


class FusedLoRMALinear(AdapterLayer):
    """A frozen ``nn.Linear`` with a LoRMA adapter: ``y = x (T W0)^T + bias``.

    Args:
        base_layer: the ``nn.Linear`` to adapt; its weight and bias are frozen.
        r: rank of the factors.
        alpha: scaling numerator, ``s = alpha / r`` (> 0).
        variant: ``"plus"`` (``T = I + s B A``), ``"pi"`` (``T = s shift(B A)``) or ``"naive"``
            (``T = s B A``); see the module docstring.
        fan_in_fan_out: see :class:`~pefttriton.adapters.adapter_layer.AdapterLayer`.

    Trainable parameters: ``lorma_A`` (r, out_features) and ``lorma_B`` (out_features, r), float32
    (float64 for a float64 base layer). Inputs must have the base layer's dtype.

    Merging: ``merge()`` writes ``T W0`` into the base weight. Multiplicative updates do not undo
    by subtraction, so ``unmerge()`` restores ``W0`` as follows. pi and naive (and plus for 16-bit
    weights or an ill-conditioned ``I_r + s A B``) keep a copy of ``W0`` while merged (one weight's
    memory, freed by ``unmerge``) and restore it bit for bit; naive's ``T`` is singular and pi's
    would need an (m, m) solve. plus in fp32/fp64 with ``cond(T) <= WOODBURY_MAX_COND`` keeps
    nothing and inverts with the Woodbury identity ``W0 = W - s B (I_r + s A B)^{-1} (A W)`` (an
    r x r solve), within about ``cond(T) * eps`` of ``W0``. Do not change the factors while merged.
    """

    adapter_type = "lorma"
    adapter_layer_names = ("lorma_A", "lorma_B")
    settings = ("alpha", "variant")
    fixed_settings = ("variant",)

    def __init__(
        self, base_layer: nn.Linear, r: int, *, alpha: float = 16.0, variant: str = "plus", fan_in_fan_out: bool = False
    ) -> None:
        super().__init__(base_layer, r, fan_in_fan_out=fan_in_fan_out)
        self.alpha = alpha
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        m = self.out_features
        self.lorma_A = nn.Parameter(torch.zeros(r, m, **self._new_param_kwargs()))
        self.lorma_B = nn.Parameter(torch.zeros(m, r, **self._new_param_kwargs()))
        self.register_buffer("base_weight_copy", None, persistent=False)  # W0 while merged, if kept
        self.reset_parameters()

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = check_finite("alpha", value, positive=True)

    @property
    def scale(self) -> float:
        """``alpha / r``."""
        return self._alpha / self.r

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The variant's initialisation (module docstring)."""
        A, B = self.lorma_A, self.lorma_B
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        if self.variant == "plus":
            A.zero_()
        elif self.variant == "pi":
            B[:, 0] = 1.0
            A.zero_()
            A[0, 0] = 1.0
            A.div_(math.sqrt(self.scale))
            B.div_(math.sqrt(self.scale))
        else:
            A.copy_(torch.linalg.pinv(B))
            A.div_(math.sqrt(self.scale))
            B.div_(math.sqrt(self.scale))

    # ------------------------------------------------------------------------------ forward

    def engine_inputs(self, dtype: torch.dtype) -> LowRank:
        """plus and naive: ``A_eff = A W0`` (r, in_features), formed each step (r m n FMAs), ``B``, ``s``."""
        weight = self.base_layer.weight
        return LowRank(self.lorma_A.to(dtype) @ weight.to(dtype), self.lorma_B.to(dtype), scale=self.scale)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if self.variant == "pi":
            return lorma_pi_linear(x, weight, bias, self.lorma_A, self.lorma_B, scale=self.scale)
        if self.variant == "plus":
            return super().adapted_forward(x)
        check_x_and_weight(x, weight)
        a_eff, B, _, _, scale = self.engine_inputs(weight.dtype)  # naive: no base GEMM at all
        return F.linear(F.linear(x, a_eff), B * scale, bias)

    # ------------------------------------------------------------------------ the update

    def base_weight(self) -> torch.Tensor:
        """``W0`` (out_features, in_features) in the factors' dtype, also while merged."""
        weight = self.base_layer.weight
        if not self.merged:
            return weight.to(self.param_dtype)
        if self.base_weight_copy is not None:
            return self.base_weight_copy.to(self.param_dtype)
        self._check_invertible()
        return self._woodbury_unmerged(weight.to(self.param_dtype))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``lorma_A``, ``lorma_B`` in :attr:`param_dtype`, for the update's math (merge, unmerge,
        ``delta_weight``). The factors are float32 unless the whole layer was cast (``.half()``,
        ``.to(torch.bfloat16)``), which casts them with the base weight: then they are widened here,
        since ``W0`` is read in :attr:`param_dtype` too."""
        dtype = self.param_dtype
        return self.lorma_A.to(dtype), self.lorma_B.to(dtype)

    def multiplier(self) -> torch.Tensor:
        """The (m, m) multiplier ``T`` with ``W = T W0``; for analysis (forward never forms it for plus/naive)."""
        (A, B), s = self._factors(), self.scale
        if self.variant == "pi":
            return shift_product(B, A, s).to(A.dtype)
        T = s * (B @ A)
        if self.variant == "plus":
            T = T + torch.eye(self.out_features, device=A.device, dtype=A.dtype)
        return T

    def adapted_weight(self) -> torch.Tensor:
        """``T W0`` (out_features, in_features) in the factors' dtype: the weight the layer applies."""
        return self.base_weight() + self.delta_weight()

    def delta_weight(self) -> torch.Tensor:
        """``T W0 - W0`` (out_features, in_features) in fp32 (fp64 for an fp64 layer).

        plus: ``s B (A W0)`` (rank <= r); pi: ``(s shift(B A) - I) W0``; naive: ``s B (A W0) - W0``.
        """
        W0 = self.base_weight()
        (A, B), s = self._factors(), self.scale
        if self.variant == "plus":
            return s * (B @ (A @ W0))
        if self.variant == "naive":
            return s * (B @ (A @ W0)) - W0
        eye = torch.eye(self.out_features, device=A.device, dtype=A.dtype)
        return (shift_product(B, A, s).to(A.dtype) - eye) @ W0

    # ------------------------------------------------------------------------ merge / unmerge

    def plus_multiplier_cond(self) -> float:
        """2-norm condition number of ``T = I + s B A`` in O(m r^2), without forming T.

        T is the identity on the complement of ``span([B, A^T])`` and maps that span (dimension
        k <= 2r, orthonormal basis Q) into itself, so its singular values are those of
        ``I_k + (Q^T s B)(A Q)`` and, when k < m, ones.
        """
        A, B = (t.detach() for t in self._factors())
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            return math.inf  # a broken adapter: T is not invertible in any useful sense
        U = self.scale * B
        Q, _ = torch.linalg.qr(torch.cat([U, A.T], dim=1))
        k = Q.shape[1]
        s = torch.linalg.svdvals(torch.eye(k, device=A.device, dtype=A.dtype) + (Q.T @ U) @ (A @ Q))
        hi, lo = s.max().item(), s.min().item()
        if k < self.out_features:
            hi, lo = max(hi, 1.0), min(lo, 1.0)
        return math.inf if lo == 0 else hi / lo

    def _check_invertible(self) -> None:
        if self.variant != "plus":
            raise RuntimeError(
                f"this merged {self.variant!r} layer has no copy of its base weight (merge() keeps one; it is not "
                "saved in state_dict), and its multiplier cannot be inverted: W0 cannot be restored"
            )

    def _woodbury_core(self) -> torch.Tensor:
        A, B = (t.detach() for t in self._factors())
        return torch.eye(self.r, device=A.device, dtype=A.dtype) + self.scale * (A @ B)

    def _woodbury_unmerged(self, W: torch.Tensor) -> torch.Tensor:
        # (I + s B A)^{-1} = I - s B (I_r + s A B)^{-1} A
        A, B = (t.detach() for t in self._factors())
        return W - self.scale * (B @ torch.linalg.solve(self._woodbury_core(), A @ W))

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Write ``T W0`` into the base weight; forward then runs the plain base layer.

        Args:
            safe_merge: check the merged weight for NaN/Inf first and raise ``ValueError``, leaving
                the base weight unchanged (PEFT's ``safe_merge``).
        """
        if self.merged:
            warnings.warn("FusedLoRMALinear is already merged; nothing to do", stacklevel=2)
            return
        merged = self.adapted_weight()
        if safe_merge:
            self.check_finite_merge(merged)
        self.untie_before_merge()
        weight = self.base_layer.weight
        invertible = (
            self.variant == "plus"
            and weight.dtype in (torch.float32, torch.float64)
            and self.plus_multiplier_cond() <= WOODBURY_MAX_COND
        )
        if not invertible:
            self.base_weight_copy = weight.detach().clone()
        weight.copy_(merged.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore ``W0`` in the base weight (from the kept copy, or by the Woodbury identity for plus)."""
        if not self.merged:
            warnings.warn("FusedLoRMALinear is not merged; nothing to do", stacklevel=2)
            return
        weight = self.base_layer.weight
        if self.base_weight_copy is not None:
            weight.copy_(self.base_weight_copy)
            self.base_weight_copy = None
        else:
            self._check_invertible()
            weight.copy_(self._woodbury_unmerged(weight.to(self.param_dtype)).to(weight.dtype))
        self.merged = False

    # ------------------------------------------------------------------------------ costs

    def extra_macs(self, tokens: int, training: bool = True) -> int:
        """Multiply-adds per step beyond the frozen base layer (``N m n`` forward, ``N m n`` grad_x).

        plus: ``r m n`` for ``A W0`` and ``N r (n + m)`` for the low-rank path forward; training adds
        ``r m n`` for grad_A and ``2 N r (n + m)`` for the low-rank backward.
        pi: :func:`pefttriton.ops.lorma_pi.pi_extra_macs` at the order the op picks.
        naive: the same prep and low-rank path as plus, minus the base GEMMs it drops (negative).
        """
        N, m, n, r = tokens, self.out_features, self.in_features, self.r
        if self.variant == "pi":
            return pi_extra_macs(N, m, n, r, pi_order(N, m, n, training, r=r), training)
        lowrank = (2 * r * m * n + 3 * N * r * (n + m)) if training else (r * m * n + N * r * (n + m))
        if self.variant == "plus":
            return lowrank
        return lowrank - (2 if training else 1) * N * m * n
