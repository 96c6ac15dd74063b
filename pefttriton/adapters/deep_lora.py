"""Deep LoRA (Yaras et al., "Compressible Dynamics in Deep Overparameterized Low-Rank Learning &
Adaptation", ICML 2024) as a drop-in module: ``h = W0 x + bias + W3 W2 W1 x``.

The update is the rank-r compression of a full-width three-layer factorisation
``W0 + W3' W2' W1'`` (W1' (d, n), W2' (d, d), W3' (m, d), d = max(m, n)) with orthogonal
initialisation of small scale ``eps``. For small ``eps`` its gradient-descent dynamics stay in
a rank-r invariant subspace that is visible in the gradient at initialisation (paper section 2,
Theorem 2.1, Prop. 2.2), so only the restriction to that subspace is trained:
``W1`` (r, n), ``W2`` (r, r), ``W3`` (m, r).

Each step the adapter is prepared in plain autograd as ``A = W2 @ W1`` (r*r*n flops, independent
of the token count) and ``B = W3``, and the fused engine :func:`pefttriton.ops.lowrank_linear`
computes ``x W0^T + bias + (x A^T) B^T``; autograd carries ``grad_A`` on to ``W1`` and ``W2``.

Recipe and constants (checked against the authors' code, github.com/cjyaras/deep-lora-transformers
at commit 2bf128f: ``dlt/train.py::create_compressed_lora_train_state``, ``dlt/models.py``,
``dlt/configs.py``, ``scripts/*.py``; that repository has no ``_init_weight_orth``: the
orthogonal initialisation is flax's ``nn.initializers.orthogonal(scale=init_scale)`` in
``MatrixFactorization``):

* ``eps = 1e-3`` (:data:`DEFAULT_EPS`): ``lora_init_scale`` in ``dlt/configs.py`` and in every
  script; the paper's appendix B, "orthogonal initialization of scale eps".
* depth 3 (``lora_depth = 3``; paper section 4.1, "typically we choose L = 3").
* The gradient comes from one training batch (``next(train_iterator)``, batch size 16 in the
  paper), with the model in evaluation mode (``is_train=False``: no dropout), of the loss with
  respect to each adapted weight. The authors differentiate at the full-width initialisation
  ``W0 + eps^3 E``; :func:`compress_init` differentiates at ``W0`` (the difference is of order
  ``eps^3 = 1e-9``).
* The subspace (``get_left_right_factors``): let ``E`` be the direction of the full-width
  initialisation's end-to-end product (``W3' W2' W1' = eps^3 E``; a Haar random (m, n) matrix
  with orthonormal rows or columns, which is what a product of independent orthogonal factors
  is). On the wide side (out if m >= n, else in; the authors take the square outer factor, which
  sits on the wide side), the basis spans the top ``ceil(r/2)`` singular vectors of the gradient
  ``G`` on that side plus the top ``floor(r/2)`` singular vectors of the other side mapped through
  ``E``; the narrow side's factor is that basis mapped back through ``E``. The authors compute
  the same space as the orthogonal complement of the intersection of two ``(d - r/2)``-dimensional
  spaces read off the SVD of the full-width factor's gradient (``V0``, ``Va``, ``Vb``); since
  ``(S1 n S2)^perp = S1^perp + S2^perp`` the two constructions agree, which
  ``tests/test_deep_lora.py`` checks against a literal transcription. The authors use
  ``half_rank = rank // 2`` and require an even rank (a width-r compression holds a gradient
  signal of rank r/2, the "2r" of Theorem 2.1); for odd ``r`` the gradient's own singular vectors
  get the extra column (our choice).
* Inner factor ``eps * I`` (``mf_params[w] = lora_init_scale * jnp.eye(rank)``), so the update
  starts at ``eps^3 * P_out E P_in``, the full-width initialisation restricted to the subspace.
* Discrepant learning rate: outer factors at ``gamma * lr``, inner at ``lr``
  (``optax.multi_transform`` with "outer" = left/right). The authors' ``lora_gamma`` is 0 by
  default in ``configs.py`` (outer factors frozen), ``1e-2`` in ``scripts/stsb_narrow.py`` (the
  appendix D.2 ablation, Adam with inner lr 1e-2, i.e. outer lr 1e-4) and 1 in
  ``scripts/nlg_fewshot.py``. Optimiser there: AdamW(b1=0.9, b2=0.999, eps=1e-6).

One deliberate difference (the engine takes three factors): the authors keep the orthonormal
outer factors ``U`` (m, r), ``V`` (n, r) apart from a depth-3 chain of (r, r) inner factors, ``U M3 M2 M1 V^T``
(3 r^2 parameters more than LoRA). Here ``W3 = U M3``, ``W2 = M2``, ``W1 = M1 V^T``: the same
end-to-end update at initialisation and r^2 parameters more than LoRA. Under plain gradient
descent on deep matrix factorisation, training all three factors at one rate follows the paper's
eq. (9) compression (bases fixed, inner factors trained) exactly, because the gradients of
``W1`` and ``W3`` stay in the subspace (measured difference 3e-15;
``tests/test_deep_factorization.py``). Under Adam the forms differ: ``W1`` and
``W3`` have entries of order ``eps / sqrt(n)`` instead of ``1 / sqrt(n)``, so an Adam step of
``gamma * lr`` moves them relatively ``1 / eps`` times faster than the authors' outer factors.
To match the authors' relative outer speed, take ``gamma`` about ``eps`` times theirs.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pefttriton.adapters.adapter_layer import AdapterLayer, LowRank

DEFAULT_EPS = 1e-3
"""Initialisation scale: the authors' ``lora_init_scale`` (dlt/configs.py and every script)."""


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    return float(eps)


def random_partial_isometry(
    m: int, n: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """A Haar random (m, n) matrix with orthonormal columns (m >= n) or rows (m < n), on the CPU.

    QR of a standard Gaussian (max(m, n), min(m, n)) matrix with the signs of R's diagonal moved
    into Q (so the distribution is Haar, not biased by the QR convention); transposed when m < n.
    """
    big, small = max(m, n), min(m, n)
    gauss = torch.randn(big, small, generator=generator, dtype=torch.float64)
    q, rr = torch.linalg.qr(gauss)
    signs = torch.sign(torch.diagonal(rr))
    q = q * torch.where(signs == 0, torch.ones_like(signs), signs)
    return (q if m >= n else q.T).to(dtype)


def compression_bases(grad: torch.Tensor, end_to_end: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-r subspaces of the compression (see the module docstring), in float64.

    Args:
        grad: (m, n) gradient ``dL/dW`` of the loss with respect to the adapted weight.
        end_to_end: (m, n) direction ``E`` of the full-width initialisation's product
            (orthonormal rows or columns, see :func:`random_partial_isometry`).
        r: compressed width, 1 <= r <= min(m, n).

    Returns:
        ``(out_basis, in_basis)`` of shapes (m, r) and (n, r): the factor on the wide side
        (out if m >= n) has orthonormal columns, the other one is it mapped through ``E``, so the
        compressed initialisation ``eps^3 out_basis in_basis^T`` is ``eps^3 E`` restricted.
    """
    if grad.dim() != 2:
        raise ValueError(f"grad must be a 2-D (out_features, in_features) tensor, got shape {tuple(grad.shape)}")
    m, n = grad.shape
    if tuple(end_to_end.shape) != (m, n):
        raise ValueError(f"end_to_end must have shape {(m, n)} like grad, got {tuple(end_to_end.shape)}")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(m, n):
        raise ValueError(f"r must be an int in [1, min(out_features, in_features)] = [1, {min(m, n)}], got {r!r}")
    G = grad.detach().to(torch.float64)
    E = end_to_end.detach().to(device=G.device, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    own, mapped = (r + 1) // 2, r // 2
    if m >= n:  # wide side = out: top left singular vectors of G, plus E (top right ones)
        span = torch.cat([U[:, :own], E @ Vh[:mapped].T], dim=1)
    else:  # wide side = in: top right singular vectors of G, plus E^T (top left ones)
        span = torch.cat([Vh[:own].T, E.T @ U[:, :mapped]], dim=1)
    basis, _ = torch.linalg.qr(span)  # (wide, r) orthonormal
    if m >= n:
        return basis, E.T @ basis
    return E @ basis, basis


def compression_factors(
    grad: torch.Tensor, end_to_end: torch.Tensor, r: int, eps: float = DEFAULT_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W1, W2, W3) = (eps * in_basis^T, eps * I_r, eps * out_basis)``, float64.

    See :func:`compression_bases` for the arguments; shapes (r, n), (r, r), (m, r).
    """
    eps = _check_eps(eps)
    out_basis, in_basis = compression_bases(grad, end_to_end, r)
    eye = torch.eye(r, dtype=torch.float64, device=out_basis.device)
    return eps * in_basis.T.contiguous(), eps * eye, eps * out_basis


class FusedDeepLoRALinear(AdapterLayer):
    """A frozen ``nn.Linear`` plus a compressed Deep LoRA adapter ``W3 W2 W1``, on the fused engine.

    Args:
        base_layer: the ``nn.Linear`` to adapt; its weight and bias are frozen.
        r: compressed width (the authors use 8).
        eps: initialisation scale (:data:`DEFAULT_EPS` = 1e-3, the authors' value).
        fan_in_fan_out: see :class:`~pefttriton.adapters.adapter_layer.AdapterLayer`.

    Trainable parameters: ``W1`` (r, in_features), ``W2`` (r, r), ``W3`` (out_features, r), float32
    (float64 for a float64 base layer): ``r^2`` more than LoRA of the same rank. Engine:
    ``A = W2 @ W1`` (r*r*n flops per step, independent of the tokens), ``B = W3``, ``scale = 1``.

    Initialisation: until :func:`compress_init` runs, each factor is an independent scaled
    orthogonal matrix (``torch.nn.init.orthogonal_(gain=eps)``): the narrow "Random" factorisation
    of the paper's appendix D.2, which the authors build as ``MatrixFactorization(rank=r)`` with
    flax's orthogonal initialiser of scale ``eps``. :func:`compress_init` replaces it with the
    compressed full-width initialisation. Either way the layer starts within ``eps^3`` of the
    base layer.
    """

    adapter_type = "deep_lora"
    adapter_layer_names = ("W1", "W2", "W3")
    settings = ("eps",)

    def __init__(self, base_layer: nn.Linear, r: int, *, eps: float = DEFAULT_EPS, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, r, fan_in_fan_out=fan_in_fan_out)
        self.eps = _check_eps(eps)
        kw = self._new_param_kwargs()
        self.W1 = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.W2 = nn.Parameter(torch.empty(r, r, **kw))
        self.W3 = nn.Parameter(torch.empty(self.out_features, r, **kw))
        for factor in (self.W1, self.W2, self.W3):
            nn.init.orthogonal_(factor, gain=self.eps)
        # Set only inside compress_init: forward then runs the plain base layer with this leaf as
        # its weight, so the gradient with respect to W (at W0) can be read off.
        self._probe_weight: torch.Tensor | None = None

    def engine_inputs(self, dtype: torch.dtype) -> LowRank:
        return LowRank((self.W2 @ self.W1).to(dtype), self.W3.to(dtype))

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._probe_weight is not None:
            return F.linear(x, self._probe_weight, self.base_layer.bias)
        return super().adapted_forward(x)


def _deep_lora_layers(model: nn.Module) -> list[tuple[str, FusedDeepLoRALinear]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, FusedDeepLoRALinear)]
    if not layers:
        raise ValueError("model has no FusedDeepLoRALinear layer")
    return layers


def compress_init(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    eps: float | None = None,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Initialise every :class:`FusedDeepLoRALinear` of ``model`` by the paper's compression.

    One forward and backward of ``loss_fn(model)`` with every Deep LoRA layer running its plain
    base layer (``W = W0``) and the whole model in eval mode (no dropout; the authors'
    ``is_train=False``) gives each layer's ``G = dL/dW``; then, per layer,
    ``(W1, W2, W3) = compression_factors(G, E, r, eps)`` with a fresh random end-to-end direction
    ``E`` (see the module docstring for the recipe and where each constant comes from). The
    model's training flags and every parameter other than W1, W2, W3 are left as they were; no
    ``.grad`` is touched.

    Args:
        model: a module containing FusedDeepLoRALinear layers (none of them merged).
        loss_fn: ``loss_fn(model) -> scalar tensor``, the training loss on one batch, e.g.
            ``lambda m: F.cross_entropy(m(inputs), labels)``.
        eps: initialisation scale for every layer; None keeps each layer's own ``eps``.
        generator: CPU generator for the directions ``E``, drawn with
            :func:`random_partial_isometry` layer by layer in ``model.named_modules()`` order;
            the global generator when None.

    Returns:
        ``{layer name: top-r singular values of G}``, float64, for inspection.
    """
    layers = _deep_lora_layers(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable model -> scalar loss, got {type(loss_fn).__name__}")
    if eps is not None:
        eps = _check_eps(eps)
    for name, layer in layers:
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged; unmerge it before compress_init")
        if layer.r > min(layer.in_features, layer.out_features):
            raise ValueError(
                f"layer {name!r}: compression needs r <= min(in_features, out_features) = "
                f"{min(layer.in_features, layer.out_features)}, got r={layer.r}"
            )
    training = {module: module.training for module in model.modules()}
    probes = []
    try:
        for _, layer in layers:
            layer._probe_weight = layer.base_layer.weight.detach().clone().requires_grad_(True)
            probes.append(layer._probe_weight)
        model.eval()
        with torch.enable_grad():
            loss = loss_fn(model)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
            grads = torch.autograd.grad(loss.reshape(()), probes, allow_unused=True)
    finally:
        for _, layer in layers:
            layer._probe_weight = None
        for module, flag in training.items():
            module.train(flag)
    spectra = {}
    for (name, layer), grad in zip(layers, grads):
        if grad is None:
            raise ValueError(f"the loss does not depend on layer {name!r}; cannot compress it")
        if eps is not None:
            layer.eps = eps
        E = random_partial_isometry(layer.out_features, layer.in_features, generator=generator)
        W1, W2, W3 = compression_factors(grad, E, layer.r, layer.eps)
        with torch.no_grad():
            for param, value in ((layer.W1, W1), (layer.W2, W2), (layer.W3, W3)):
                param.copy_(value.to(device=param.device, dtype=param.dtype))
        spectra[name] = torch.linalg.svdvals(grad.detach().to(torch.float64))[: layer.r]
    return spectra


def discrepant_param_groups(model: nn.Module, lr: float, gamma: float) -> list[dict]:
    """Optimizer parameter groups with Deep LoRA's discrepant learning rate.

    Outer factors (every Deep LoRA layer's ``W1`` and ``W3``) at ``gamma * lr``, inner factors
    (``W2``) and every other trainable parameter of ``model`` at ``lr``. Groups are named
    ("deep_lora_outer", "deep_lora_inner", "other"); empty ones are left out. Use with any
    ``torch.optim`` optimizer: ``torch.optim.Adam(discrepant_param_groups(model, 1e-2, 1e-2))``.

    ``gamma = 0`` freezes the outer factors (the authors' default ``lora_gamma``); their appendix
    D.2 run uses ``gamma = 1e-2`` with their unit-scale outer factors (see the module docstring on
    transferring it to this parameterisation).
    """
    layers = _deep_lora_layers(model)
    for label, value in (("lr", lr), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{label} must be a non-negative finite float, got {value!r}")
    outer_ids, inner_ids = set(), set()
    for _, layer in layers:
        outer_ids.update((id(layer.W1), id(layer.W3)))
        inner_ids.add(id(layer.W2))
    outer, inner, other = [], [], []
    for param in model.parameters():  # deduplicated by nn.Module
        if not param.requires_grad:
            continue
        if id(param) in outer_ids:
            outer.append(param)
        elif id(param) in inner_ids:
            inner.append(param)
        else:
            other.append(param)
    groups = [
        {"params": outer, "lr": gamma * lr, "name": "deep_lora_outer"},
        {"params": inner, "lr": float(lr), "name": "deep_lora_inner"},
        {"params": other, "lr": float(lr), "name": "other"},
    ]
    return [group for group in groups if group["params"]]
