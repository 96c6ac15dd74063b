"""``FusedDeepLoRALinear``, ``compress_init`` and ``discrepant_param_groups``.

The layer is checked against the plain float64 formula on both backends; the compression against
a line-by-line transcription of the authors' recipe (cjyaras/deep-lora-transformers,
``dlt/train.py::get_left_right_factors``) applied to a real full-width factorisation whose
gradient comes from autograd; the training rule by running deep matrix factorisation through the
layer and comparing with plain gradient descent on the full-width factorisation.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch import nn

import pefttriton
from bench.deep_factorization import full_width_factors, low_rank_target, relative_gaps, run_gd
from pefttriton.adapters.deep_lora import (
    DEFAULT_EPS,
    FusedDeepLoRALinear,
    compress_init,
    compression_bases,
    discrepant_param_groups,
    random_partial_isometry,
)
from pefttriton.adapters.lora import FusedLoRALinear

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _randomize(layer, gen):
    """Factors of order one (the eps-scale initialisation would make every check trivially small)."""
    with torch.no_grad():
        for p in (layer.W1, layer.W2, layer.W3):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(p.shape[1]))


# --------------------------------------------------------------------- float64 reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("r", [1, 5, 6])
@pytest.mark.parametrize("lead,n,m", [((19,), 37, 29), ((2, 9), 21, 45)], ids=["flat", "batched"])
def test_against_float64_formula(backend, gen, dtype, r, lead, n, m):
    layer = FusedDeepLoRALinear(nn.Linear(n, m).to(dtype), r)
    _randomize(layer, gen)
    x = torch.randn(*lead, n, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    y = layer(x)
    assert y.shape == (*lead, m) and y.dtype == dtype
    ref = {name: t.detach().double().requires_grad_(True)
           for name, t in (("x", x), ("W1", layer.W1), ("W2", layer.W2), ("W3", layer.W3))}
    W0, bias = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    y_ref = ref["x"] @ (W0 + ref["W3"] @ ref["W2"] @ ref["W1"]).T + bias
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol
    grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(grad_out.to(dtype))
    y_ref.backward(grad_out)
    for name, ours in (("x", x), ("W1", layer.W1), ("W2", layer.W2), ("W3", layer.W3)):
        err = rel_err(ours.grad, ref[name].grad)
        assert err < tol, f"grad {name}: relative error {err:.2e}"
    assert layer.base_layer.weight.grad is None


def test_half_precision_base_layer(backend, gen):
    layer = FusedDeepLoRALinear(nn.Linear(37, 29).half(), 3)
    assert {p.dtype for p in (layer.W1, layer.W2, layer.W3)} == {torch.float32}
    _randomize(layer, gen)
    x = torch.randn(11, 37, generator=gen).half()
    y = layer(x)
    assert y.dtype == torch.float16
    W = [p.detach().double().requires_grad_(True) for p in (layer.W1, layer.W2, layer.W3)]
    y_ref = x.double() @ (layer.base_layer.weight.double() + W[2] @ W[1] @ W[0]).T + layer.base_layer.bias.double()
    assert rel_err(y, y_ref) < 5e-3
    grad_out = torch.randn(y.shape, generator=gen).half()
    y.backward(grad_out)
    y_ref.backward(grad_out.double())
    for ours, ref in zip((layer.W1, layer.W2, layer.W3), W):
        assert ours.grad.dtype == torch.float32
        assert rel_err(ours.grad, ref.grad) < 5e-3


# ------------------------------------------------------------------------ module behaviour


@pytest.mark.parametrize("r", [1, 3, 8])
@pytest.mark.parametrize("n,m", [(37, 29), (64, 64)])
def test_parameter_count_is_lora_plus_r_squared(r, n, m):
    deep = FusedDeepLoRALinear(nn.Linear(n, m), r)
    lora = FusedLoRALinear(nn.Linear(n, m), r)
    count = lambda mod: sum(p.numel() for p in mod.parameters() if p.requires_grad)  # noqa: E731
    assert count(lora) == r * (n + m)
    assert count(deep) - count(lora) == r * r
    assert {name for name, p in deep.named_parameters() if p.requires_grad} == {"W1", "W2", "W3"}
    assert deep.W1.shape == (r, n) and deep.W2.shape == (r, r) and deep.W3.shape == (m, r)


def test_default_initialisation_is_scaled_orthogonal(backend, gen):
    """Before compress_init: each factor eps times an orthogonal matrix, so ||W3 W2 W1||_2 <= eps^3."""
    torch.manual_seed(0)
    layer = FusedDeepLoRALinear(nn.Linear(37, 29).double(), 5)
    assert layer.eps == DEFAULT_EPS == 1e-3
    for W in (layer.W1, layer.W2, layer.W3):
        Q = W.detach() / layer.eps
        gram = Q @ Q.T if Q.shape[0] <= Q.shape[1] else Q.T @ Q
        assert (gram - torch.eye(min(Q.shape), dtype=Q.dtype)).abs().max() < 1e-12
    delta = layer.W3.detach() @ layer.W2.detach() @ layer.W1.detach()
    assert torch.linalg.matrix_norm(delta, ord=2) <= layer.eps**3 * (1 + 1e-9)
    x = torch.randn(6, 37, generator=gen, dtype=torch.float64)
    ref = x @ (layer.base_layer.weight.double() + delta).T + layer.base_layer.bias
    assert rel_err(layer(x), ref) < 1e-12


# (Merge / unmerge, construction errors, the forward's input check and extra_repr:
# tests/test_adapter_contract.py, for every adapter.)


def test_rejects_bad_eps():
    for eps in (0.0, -1e-3, float("inf"), "1e-3"):
        with pytest.raises(ValueError, match="eps must be a positive finite float"):
            FusedDeepLoRALinear(nn.Linear(8, 8), 2, eps=eps)


# ---------------------------------------------------------------------- compression recipe


def _authors_left_right(W1, W1_grad, e2e, rank, eps, depth=3):
    """``get_left_right_factors`` of dlt/train.py (numpy there), transcribed line by line."""

    def svd(A):
        U, s, VT = torch.linalg.svd(A, full_matrices=True)
        return U, s, VT.T

    m, n = W1.shape
    assert m == n, "Need square matrix at this point"
    half_rank = rank // 2
    Ugrad, _, Vgrad = svd(W1_grad)
    Va = W1.T @ Ugrad[:, half_rank:] / eps
    Vb = Vgrad[:, half_rank:]
    V0 = Va @ svd(torch.cat([Va, -Vb], dim=1))[2][: Va.shape[1], n:]
    V = svd(V0)[0].flip(1)
    right = V[:, :rank]
    left = e2e @ right / (eps**depth)
    return left, right


class _Probe(nn.Module):
    """One adapted layer, a fixed non-linear readout and an MSE loss on one batch of 16 tokens."""

    def __init__(self, layer, gen):
        super().__init__()
        self.layer = layer
        m, n = layer.out_features, layer.in_features
        self.readout = torch.randn(3, m, generator=gen, dtype=torch.float64)
        self.x = torch.randn(16, n, generator=gen, dtype=torch.float64)
        self.labels = torch.randn(16, 3, generator=gen, dtype=torch.float64)

    def loss_at(self, weight):
        """The same loss with an explicit weight for the adapted layer: plain autograd."""
        hidden = torch.tanh(F.linear(self.x, weight, self.layer.base_layer.bias))
        return 0.5 * ((hidden @ self.readout.T - self.labels) ** 2).sum()

    def forward(self, x):
        return torch.tanh(self.layer(x)) @ self.readout.T

    def loss(self, model):
        return 0.5 * ((model(self.x) - self.labels) ** 2).sum()


@pytest.mark.parametrize("m,n", [(23, 31), (31, 23), (27, 27)], ids=["wide-in", "wide-out", "square"])
@pytest.mark.parametrize("r", [2, 6])
def test_compress_init_matches_authors_recipe(backend, m, n, r):
    """The authors differentiate a real full-width factorisation (W3' W2' W1' = eps^3 E) and intersect
    two singular subspaces of the square outer factor's gradient; compress_init uses dL/dW at W0 and
    a sum of two small singular subspaces. The compressed updates eps^3 U V^T must agree."""
    gen = torch.Generator().manual_seed(10 + m + n + r)
    eps = DEFAULT_EPS
    base = nn.Linear(n, m).double()
    layer = FusedDeepLoRALinear(copy.deepcopy(base), r)
    probe = _Probe(layer, gen)
    compress_init(probe, probe.loss, generator=torch.Generator().manual_seed(99))

    E = random_partial_isometry(m, n, generator=torch.Generator().manual_seed(99))  # the same draw
    F1, F2, F3 = (f.requires_grad_(True) for f in full_width_factors(E, 3, eps, generator=gen))
    delta_full = F3 @ F2 @ F1
    grad_F1, grad_F3 = torch.autograd.grad(probe.loss_at(base.weight + delta_full), [F1, F3])
    delta_full = delta_full.detach()
    if m >= n:  # the authors' W1 (flax kernel orientation) is F3^T, square when out >= in
        left, right = _authors_left_right(F3.detach().T, grad_F3.T, delta_full.T, r, eps)
        out_basis, in_factor = right, left
    else:  # "WL.T will act like W1": F1
        left, right = _authors_left_right(F1.detach(), grad_F1, delta_full, r, eps)
        out_basis, in_factor = left, right
    authors_delta = eps**3 * out_basis @ in_factor.T
    ours = layer.delta_weight().detach()
    # measured: 1.0e-9 .. 3.4e-9 (the gradient points differ by eps^3 E = 1e-9); the simpler
    # recipe W3 = eps U_r, W1 = eps V_r^T (top-r singular vectors of G) is off by 1.3 .. 2.1 (relative)
    assert rel_err(ours, authors_delta) < 1e-6
    assert torch.allclose(layer.W2.detach(), eps * torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("r", [1, 3, 4])
@pytest.mark.parametrize("m,n", [(23, 31), (31, 23)], ids=["wide-in", "wide-out"])
def test_compress_init_uses_top_gradient_directions(m, n, r):
    """Independent of the authors' code: on the wide side the basis holds the top ceil(r/2)
    singular vectors of G = dL/dW at W0 (plain autograd); the returned spectrum is G's; the other
    side is the basis mapped through E; W2 = eps I; nothing else changes."""
    gen = torch.Generator().manual_seed(r + 3 * m)
    layer = FusedDeepLoRALinear(nn.Linear(n, m).double(), r, eps=0.02)
    probe = _Probe(layer, gen)
    readout_before = probe.readout.clone()
    weight_before = layer.base_layer.weight.detach().clone()
    probe.train()
    spectra = compress_init(probe, probe.loss, generator=torch.Generator().manual_seed(5))
    assert probe.training and layer.training  # flags restored
    assert torch.equal(layer.base_layer.weight, weight_before) and torch.equal(probe.readout, readout_before)
    assert all(p.grad is None for p in probe.parameters())

    w = weight_before.clone().requires_grad_(True)
    (G,) = torch.autograd.grad(probe.loss_at(w), [w])
    U, s, Vh = torch.linalg.svd(G)
    assert torch.allclose(spectra["layer"], s[:r], rtol=1e-10, atol=0)
    E = random_partial_isometry(m, n, generator=torch.Generator().manual_seed(5))
    eps = 0.02
    W1, W3 = layer.W1.detach() / eps, layer.W3.detach() / eps
    assert torch.allclose(layer.W2.detach(), eps * torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-15)
    own = (r + 1) // 2
    if m >= n:
        basis, top = W3, U[:, :own]
        assert torch.allclose(W1, (E.T @ W3).T, atol=1e-12)
    else:
        basis, top = W1.T, Vh[:own].T
        assert torch.allclose(W3, E @ W1.T, atol=1e-12)
    assert (basis.T @ basis - torch.eye(r, dtype=torch.float64)).abs().max() < 1e-12
    assert (basis @ (basis.T @ top) - top).abs().max() < 1e-10  # top directions inside the span
    if r == 1:  # the single column is the top singular vector itself (up to sign)
        assert abs(abs((basis[:, 0] @ top[:, 0]).item()) - 1.0) < 1e-12


def test_compress_init_runs_in_eval_mode_and_restores_flags():
    """Dropout in the model must not randomise the gradient: two calls with the same generator
    give the same factors although the model is in training mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), FusedDeepLoRALinear(nn.Linear(20, 12), 4), nn.Dropout(0.5)).train()
    x = torch.randn(8, 20)
    loss_fn = lambda mod: mod(x).pow(2).sum()  # noqa: E731
    compress_init(model, loss_fn, generator=torch.Generator().manual_seed(1))
    first = [p.detach().clone() for p in model[1].parameters() if p.requires_grad]
    compress_init(model, loss_fn, generator=torch.Generator().manual_seed(1))
    second = [p.detach().clone() for p in model[1].parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(module.training for module in model.modules())
    # the eval-mode gradient: without dropout the loss is ||x (W0)^T + b||^2
    w = model[1].base_layer.weight.detach().clone().requires_grad_(True)
    (G,) = torch.autograd.grad(F.linear(x, w, model[1].base_layer.bias).pow(2).sum(), [w])
    top_out = torch.linalg.svd(G.double())[0][:, 0]
    W3 = model[1].W3.detach().double()
    assert torch.linalg.vector_norm(W3 @ torch.linalg.lstsq(W3, top_out[:, None]).solution - top_out[:, None]) < 1e-5


def test_compress_init_eps_override_and_errors():
    layer = FusedDeepLoRALinear(nn.Linear(10, 9), 3)
    x = torch.randn(5, 10)
    loss_fn = lambda mod: mod(x).sum()  # noqa: E731
    compress_init(layer, loss_fn, eps=0.05)
    assert layer.eps == 0.05
    assert torch.allclose(layer.W2.detach(), 0.05 * torch.eye(3))
    with pytest.raises(ValueError, match="no FusedDeepLoRALinear"):
        compress_init(nn.Linear(3, 3), loss_fn)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        compress_init(layer, 3.0)
    with pytest.raises(ValueError, match="eps"):
        compress_init(layer, loss_fn, eps=-1.0)
    with pytest.raises(ValueError, match="scalar"):
        compress_init(layer, lambda mod: mod(x))
    with pytest.raises(ValueError, match="r <= min"):
        compress_init(FusedDeepLoRALinear(nn.Linear(10, 2), 3), lambda mod: mod(x).sum())
    two = nn.ModuleDict({"a": FusedDeepLoRALinear(nn.Linear(10, 9), 2), "b": FusedDeepLoRALinear(nn.Linear(10, 9), 2)})
    with pytest.raises(ValueError, match="does not depend on layer 'b'"):
        compress_init(two, lambda mod: mod["a"](x).sum())
    assert two["b"]._probe_weight is None  # probe mode cleaned up after the error
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        compress_init(layer, loss_fn)
    with pytest.raises(ValueError, match="r must be an int in"):
        compression_bases(torch.randn(4, 5), torch.randn(4, 5), 5)


# --------------------------------------------------------------------- discrepant rates


def test_discrepant_param_groups_one_sgd_step(backend, gen):
    torch.manual_seed(1)
    model = nn.Sequential(
        FusedDeepLoRALinear(nn.Linear(13, 11), 3), nn.Tanh(), FusedDeepLoRALinear(nn.Linear(11, 7), 2), nn.Linear(7, 2)
    )
    lr, gamma = 0.1, 0.01
    groups = discrepant_param_groups(model, lr, gamma)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"deep_lora_outer", "deep_lora_inner", "other"}
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(by_name["deep_lora_outer"]["params"]) == ids([model[0].W1, model[0].W3, model[2].W1, model[2].W3])
    assert ids(by_name["deep_lora_inner"]["params"]) == ids([model[0].W2, model[2].W2])
    assert ids(by_name["other"]["params"]) == ids([model[3].weight, model[3].bias])
    assert by_name["deep_lora_outer"]["lr"] == pytest.approx(gamma * lr) and by_name["deep_lora_inner"]["lr"] == lr
    # every trainable parameter exactly once; the frozen base weights nowhere
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == sum(1 for p in model.parameters() if p.requires_grad)

    for layer in (model[0], model[2]):
        _randomize(layer, gen)
    x = torch.randn(9, 13, generator=gen)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    loss = model(x).pow(2).sum()
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = dict(zip(map(id, trainable), torch.autograd.grad(loss, trainable)))
    opt = torch.optim.SGD(groups)
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()
    expected_lr = {**{i: gamma * lr for i in ids(by_name["deep_lora_outer"]["params"])},
                   **{i: lr for i in ids(by_name["deep_lora_inner"]["params"]) | ids(by_name["other"]["params"])}}
    for p in model.parameters():
        if id(p) in expected_lr:
            assert torch.allclose(p.detach(), before[id(p)] - expected_lr[id(p)] * grads[id(p)], rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(p.detach(), before[id(p)])


def test_discrepant_param_groups_errors():
    with pytest.raises(ValueError, match="no FusedDeepLoRALinear"):
        discrepant_param_groups(nn.Linear(3, 3), 0.1, 0.1)
    layer = FusedDeepLoRALinear(nn.Linear(5, 5), 2)
    for lr, gamma in ((-0.1, 0.1), (0.1, -1.0), (float("nan"), 0.1)):
        with pytest.raises(ValueError, match="must be a non-negative finite float"):
            discrepant_param_groups(layer, lr, gamma)
    groups = discrepant_param_groups(layer, 0.1, 0.0)  # gamma 0: outer factors frozen, like the authors' default
    assert [g["name"] for g in groups] == ["deep_lora_outer", "deep_lora_inner"] and groups[0]["lr"] == 0.0


# ------------------------------------------- deep matrix factorisation through the layer


def _factorisation_loss(layer, target):
    """1/2 ||W3 W2 W1 - Phi||_F^2 through the layer: base weight 0, x = I, so y = delta^T."""
    x = torch.eye(layer.in_features, dtype=torch.float64)
    return lambda mod: 0.5 * ((mod(x) - target.T) ** 2).sum()


def test_factorisation_through_layer_tracks_full_width_torch():
    """compress_init + SGD with discrepant_param_groups(gamma=1) through FusedDeepLoRALinear is
    plain GD on the compressed factorisation: its update stays within the Prop. 2.2 bound of the
    full-width run started at the same eps^3 E (measured: equal to the bound at step 0 and
    non-increasing), and equals plain GD on its own initial factors to ~1e-15."""
    d, k, eps, lr, steps = 40, 3, 0.05, 0.1, 400
    gen = torch.Generator().manual_seed(0)
    target = low_rank_target(d, d, k, generator=gen)
    base = nn.Linear(d, d, bias=False).double()
    nn.init.zeros_(base.weight)
    layer = FusedDeepLoRALinear(base, 2 * k, eps=eps)
    loss_fn = _factorisation_loss(layer, target)
    with pefttriton.use_backend("torch"):
        compress_init(layer, loss_fn, generator=torch.Generator().manual_seed(11))
        init = [p.detach().clone() for p in (layer.W1, layer.W2, layer.W3)]
        opt = torch.optim.SGD(discrepant_param_groups(layer, lr, 1.0))
        trajectory = [layer.delta_weight().detach().clone()]
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(layer).backward()
            opt.step()
            trajectory.append(layer.delta_weight().detach().clone())
    trajectory = torch.stack(trajectory)
    E = random_partial_isometry(d, d, generator=torch.Generator().manual_seed(11))
    full = run_gd(full_width_factors(E, 3, eps, generator=gen), target, lr=lr, steps=steps)
    gaps = relative_gaps(trajectory, full, target)
    bound = math.sqrt(d - 2 * k) * eps**3 / torch.linalg.matrix_norm(target).item()
    assert gaps.max().item() <= bound * (1 + 1e-6)
    assert torch.linalg.matrix_norm(full[-1] - target) / torch.linalg.matrix_norm(target) < 1e-3  # it did learn
    plain = run_gd(init, target, lr=lr, steps=steps)
    assert (trajectory - plain).abs().max().item() < 1e-11


def test_factorisation_through_layer_triton_backend(gen):
    """The same training through the Triton kernels (interpreter), a few steps, from order-one
    factors so every step moves them: equal to plain GD on the factors to 1e-10 relative."""
    d, r, lr, steps = 21, 5, 0.02, 6
    target = torch.randn(d, d, generator=gen, dtype=torch.float64)
    base = nn.Linear(d, d, bias=False).double()
    nn.init.zeros_(base.weight)
    layer = FusedDeepLoRALinear(base, r)
    _randomize(layer, gen)
    init = [p.detach().clone() for p in (layer.W1, layer.W2, layer.W3)]
    loss_fn = _factorisation_loss(layer, target)
    with pefttriton.use_backend("triton"):
        opt = torch.optim.SGD(discrepant_param_groups(layer, lr, 0.5))
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(layer).backward()
            opt.step()
    plain = run_gd(init, target, lr=lr, steps=steps, lr_scales=[0.5, 1.0, 0.5])
    assert rel_err(layer.delta_weight(), plain[-1]) < 1e-10
    assert rel_err(plain[-1], plain[0]) > 1e-2  # the steps did move the update
