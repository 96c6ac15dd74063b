"""``FusedLoRALinear`` against PEFT's LoRA layer and a plain float64 formula, on both backends."""

import copy
import math

import peft
import pytest
import torch
from helpers import rel_err
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

import pefttriton
from pefttriton.adapters.lora import FusedLoRALinear
from pefttriton.ops import lowrank_linear

IN, HID = 37, 29  # odd sizes, multiples of nothing
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(IN, HID)
        self.lin2 = nn.Linear(HID, IN)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x)))


def _peft_and_fused(dtype, r, alpha, dropout=0.0, seed=0):
    """The same tiny model adapted by PEFT's LoRA and by FusedLoRALinear, with equal (random,
    B non-zero so every gradient is non-trivial) adapter weights on both sides."""
    torch.manual_seed(seed)
    base = TwoLayers().to(dtype)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin1", "lin2"], lora_dropout=dropout)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    modules = dict(peft_model.base_model.model.named_modules())
    fused_model = copy.deepcopy(base)
    pairs = {}
    gen = torch.Generator().manual_seed(seed + 1)
    for name in ("lin1", "lin2"):
        theirs = modules[name]
        assert isinstance(theirs, PeftLoraLinear)
        mine = FusedLoRALinear(getattr(fused_model, name), r, alpha=alpha, dropout=dropout)
        setattr(fused_model, name, mine)
        A = torch.randn(mine.lora_A.shape, generator=gen, dtype=torch.float64) / math.sqrt(mine.in_features)
        B = torch.randn(mine.lora_B.shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            for param, value in ((theirs.lora_A["default"].weight, A), (theirs.lora_B["default"].weight, B),
                                 (mine.lora_A, A), (mine.lora_B, B)):
                param.copy_(value.to(param.dtype))
        assert mine.scale == theirs.scaling["default"]
        pairs[name] = (mine, theirs)
    return fused_model, peft_model, pairs


def _compare(fused_model, peft_model, pairs, dtype, tol, gen, seed=None):
    x = torch.randn(3, 7, IN, generator=gen, dtype=torch.float64).to(dtype)
    x_fused, x_peft = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    y_fused = fused_model(x_fused)
    if seed is not None:
        torch.manual_seed(seed)  # the same dropout masks on both sides
    y_peft = peft_model(x_peft)
    assert y_fused.dtype == dtype
    assert rel_err(y_fused, y_peft) < tol
    grad_out = torch.randn(y_peft.shape, generator=gen, dtype=torch.float64).to(dtype)
    y_fused.backward(grad_out)
    y_peft.backward(grad_out)
    assert rel_err(x_fused.grad, x_peft.grad) < tol
    for name, (mine, theirs) in pairs.items():
        for label, ours, ref in (("lora_A", mine.lora_A, theirs.lora_A["default"].weight),
                                 ("lora_B", mine.lora_B, theirs.lora_B["default"].weight)):
            assert ours.grad is not None and ref.grad is not None, f"{name}.{label}: no gradient"
            err = rel_err(ours.grad, ref.grad)
            assert err < tol, f"{name}.{label} grad: relative error {err:.2e}"


# ------------------------------------------------------------------------------ PEFT parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("r,alpha", [(1, 8.0), (5, 7.0), (12, 16.0)])
def test_matches_peft(backend, gen, dtype, r, alpha):
    fused_model, peft_model, pairs = _peft_and_fused(dtype, r, alpha)
    _compare(fused_model, peft_model, pairs, dtype, TOL[dtype], gen)


def test_matches_peft_with_dropout_in_training(gen):
    """dropout > 0 in training runs the documented unfused composition; with the same seed it
    draws the same masks as PEFT, so outputs and gradients must agree."""
    fused_model, peft_model, pairs = _peft_and_fused(torch.float64, 6, 8.0, dropout=0.3)
    fused_model.train()
    peft_model.train()
    _compare(fused_model, peft_model, pairs, torch.float64, 1e-10, gen, seed=7)
    # non-vacuity: with dropout the adapter output differs from the dropout-free one
    x = torch.randn(5, IN, generator=gen, dtype=torch.float64)
    layer = pairs["lin1"][0]
    with torch.no_grad():
        y_train = layer(x)
        layer.eval()
        y_eval = layer(x)
    assert rel_err(y_train, y_eval) > 1e-3


def test_matches_peft_with_dropout_in_eval(backend, gen):
    fused_model, peft_model, pairs = _peft_and_fused(torch.float32, 5, 8.0, dropout=0.3)
    fused_model.eval()
    peft_model.eval()
    _compare(fused_model, peft_model, pairs, torch.float32, 1e-5, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_initialisation_draws_like_peft(dtype):
    """Same torch.manual_seed, same targets: pefttriton's lora_A equal PEFT's bit for bit, layer
    after layer (PEFT draws three Kaiming-uniform tensors per layer: A, B, then A again)."""
    r = 6
    base = TwoLayers().to(dtype)
    torch.manual_seed(123)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, target_modules=["lin1", "lin2"]))
    after_peft = torch.rand(3)
    torch.manual_seed(123)
    ours = pefttriton.inject(copy.deepcopy(base), pefttriton.LoRAConfig(r=r, target_modules=["lin1", "lin2"]))
    assert torch.equal(torch.rand(3), after_peft)  # the global generator is left where PEFT leaves it
    for name in ("lin1", "lin2"):
        peft_layer = peft_model.base_model.model.get_submodule(name)
        layer = ours.get_submodule(name)
        assert layer.lora_A.dtype == dtype
        assert torch.equal(layer.lora_A.detach(), peft_layer.lora_A["default"].weight.detach())
        assert torch.equal(layer.lora_B.detach(), torch.zeros(layer.out_features, r, dtype=dtype))


def test_initialisation_is_peft_default(gen):
    """A: uniform on [-1/sqrt(in), 1/sqrt(in)] (PEFT's init_lora_weights=True), B = 0."""
    r = 6
    layer = FusedLoRALinear(nn.Linear(IN, HID), r, alpha=8.0)
    assert torch.equal(layer.lora_B.detach(), torch.zeros(HID, r))
    # the distribution PEFT documents: uniform on [-1/sqrt(in), 1/sqrt(in)]
    bound = 1.0 / math.sqrt(IN)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    peft_model = peft.get_peft_model(TwoLayers(), peft.LoraConfig(r=r, target_modules=["lin1"]))
    peft_A = peft_model.base_model.model.lin1.lora_A["default"].weight
    assert peft_A.abs().max() <= bound and peft_A.abs().max() > 0.8 * bound
    assert layer.scale == peft_model.base_model.model.lin1.scaling["default"] == 8.0 / r


# --------------------------------------------------------------------- float64 reference


def _reference(x, weight, bias, A, B, scale):
    return x @ weight.T + bias + scale * ((x @ A.T) @ B.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("r", [1, 3, 10])
@pytest.mark.parametrize("lead,n,m", [((19,), 37, 29), ((2, 9), 21, 45)], ids=["flat", "batched"])
def test_against_float64_formula(backend, gen, dtype, r, lead, n, m):
    layer = FusedLoRALinear(nn.Linear(n, m).to(dtype), r, alpha=5.0)
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen)
    x = torch.randn(*lead, n, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    y = layer(x)
    assert y.shape == (*lead, m) and y.dtype == dtype
    ref = {k: v.detach().double().requires_grad_(True) for k, v in
           (("x", x), ("A", layer.lora_A), ("B", layer.lora_B))}
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    y_ref = _reference(ref["x"], w, b, ref["A"], ref["B"], 5.0 / r)
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol
    grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(grad_out.to(dtype))
    y_ref.backward(grad_out)
    for name, ours in (("x", x), ("A", layer.lora_A), ("B", layer.lora_B)):
        err = rel_err(ours.grad, ref[name].grad)
        assert err < tol, f"grad {name}: relative error {err:.2e}"
    assert layer.base_layer.weight.grad is None


def test_half_precision_base_layer(backend, gen):
    """fp16 base layer, fp32 trainable factors cast to fp16 for the op."""
    layer = FusedLoRALinear(nn.Linear(IN, HID).half(), 5)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen)
    x = torch.randn(13, IN, generator=gen).half()
    y = layer(x)
    assert y.dtype == torch.float16
    A64 = layer.lora_A.detach().double().requires_grad_(True)
    B64 = layer.lora_B.detach().double().requires_grad_(True)
    y_ref = _reference(x.double(), layer.base_layer.weight.double(), layer.base_layer.bias.double(), A64, B64, layer.scale)
    assert rel_err(y, y_ref) < 5e-3
    grad_out = torch.randn(y.shape, generator=gen).half()
    y.backward(grad_out)
    y_ref.backward(grad_out.double())
    assert layer.lora_A.grad.dtype == torch.float32
    assert rel_err(layer.lora_A.grad, A64.grad) < 5e-3
    assert rel_err(layer.lora_B.grad, B64.grad) < 5e-3


# ------------------------------------------------------------------ memory saved for backward


def _saved_numels(fn, x):
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    y.sum().backward()
    return numels


@pytest.mark.parametrize("dropout,training", [(0.0, True), (0.25, False)], ids=["p0-train", "p0.25-eval"])
def test_fused_path_saves_what_the_engine_saves(backend, gen, dropout, training):
    """p == 0 (or eval mode): the layer is exactly one engine call; it keeps x and x A^T and no
    dropped copy of x and no (tokens, out) tensor."""
    N, n, m, r = 64, 40, 48, 8
    layer = FusedLoRALinear(nn.Linear(n, m), r, dropout=dropout).train(training)
    x = torch.randn(N, n, generator=gen, requires_grad=True)
    saved = _saved_numels(layer, x)
    engine_saved = _saved_numels(
        lambda x: lowrank_linear(x, layer.base_layer.weight, layer.base_layer.bias,
                                 layer.lora_A.detach().requires_grad_(True),
                                 layer.lora_B.detach().requires_grad_(True), scale=layer.scale), x)
    assert sorted(saved) == sorted(engine_saved)
    assert saved.count(N * n) == 1, saved  # x itself, for grad_A
    assert N * m not in saved


def test_dropout_in_training_cost_is_as_documented(gen):
    """The unfused dropout path keeps two (N, in) tensors (dropped input and mask), never (N, out)."""
    N, n, m, r = 64, 40, 48, 8
    layer = FusedLoRALinear(nn.Linear(n, m), r, dropout=0.25).train()
    x = torch.randn(N, n, generator=gen, requires_grad=True)
    saved = _saved_numels(layer, x)
    assert saved.count(N * n) == 2, saved
    assert N * m not in saved
    assert N * r in saved


# --------------------------------------------------------------------------- module behaviour
# (Initial output, parameter names, shapes and dtypes, merge / unmerge, construction errors, the
# forward's input check and extra_repr: tests/test_adapter_contract.py, for every adapter.)


def test_parameter_count_matches_peft():
    r = 7
    layer = FusedLoRALinear(nn.Linear(IN, HID), r)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == r * (IN + HID)
    peft_model = peft.get_peft_model(TwoLayers(), peft.LoraConfig(r=r, target_modules=["lin1"]))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == r * (IN + HID)


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("dropout", [-0.1, 1.0, "0.1"])
def test_rejects_bad_dropout(dropout):
    with pytest.raises(ValueError, match="dropout"):
        FusedLoRALinear(nn.Linear(IN, HID), 2, dropout=dropout)


@pytest.mark.parametrize("alpha", [float("nan"), "8", None])
def test_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        FusedLoRALinear(nn.Linear(IN, HID), 2, alpha=alpha)
