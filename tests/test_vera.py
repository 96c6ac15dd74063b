"""``FusedVeRALinear`` / ``VeRAProjections`` against PEFT's VeRA layer and the float64 reference."""

import copy

import peft
import pytest
import torch
from helpers import rel_err
from peft.tuners.vera.layer import Linear as PeftVeraLinear
from torch import nn

from pefttriton import FusedVeRALinear, VeRAProjections
from pefttriton.ops.naive import lowrank_linear_reference

SEED = 1234
R = 16


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(70, 45)
        self.lin2 = nn.Linear(45, 70)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x)))


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(70, 45)

    def forward(self, x):
        return self.lin1(x)


def _vera_config(targets):
    return peft.VeraConfig(
        r=R, target_modules=list(targets), projection_prng_key=SEED, d_initial=0.1, vera_dropout=0.0
    )


def _peft_layers(peft_model, names):
    modules = dict(peft_model.base_model.model.named_modules())
    layers = {name: modules[name] for name in names}
    assert all(isinstance(layer, PeftVeraLinear) for layer in layers.values())
    return layers


def _randomize_lambdas(fused_layers, peft_layers, gen):
    """The same random lambda_d / lambda_b on both sides (in the dtype each side keeps them)."""
    for name, fused in fused_layers.items():
        peft_layer = peft_layers[name]
        # float32-representable values, so both sides hold exactly the same numbers whether they
        # keep the lambdas in float32 (FusedVeRALinear's default) or in the model's dtype (PEFT).
        lambda_d = torch.randn(fused.r, generator=gen).double()
        lambda_b = torch.randn(fused.out_features, generator=gen).double()
        with torch.no_grad():
            peft_d, peft_b = peft_layer.vera_lambda_d["default"], peft_layer.vera_lambda_b["default"]
            peft_d.copy_(lambda_d.to(peft_d.dtype))
            peft_b.copy_(lambda_b.to(peft_b.dtype))
            fused.lambda_d.copy_(lambda_d.to(fused.lambda_d.dtype))
            fused.lambda_b.copy_(lambda_b.to(fused.lambda_b.dtype))


def _compare_outputs_and_grads(fused_model, peft_model, fused_layers, peft_layers, gen, dtype, tol):
    x = torch.randn(3, 11, 70, generator=gen, dtype=torch.float64).to(dtype)
    x_fused = x.clone().requires_grad_(True)
    x_peft = x.clone().requires_grad_(True)
    y_fused = fused_model(x_fused)
    y_peft = peft_model(x_peft)
    assert y_fused.dtype == y_peft.dtype == dtype
    err = rel_err(y_fused, y_peft)
    assert err < tol, f"output: relative error {err:.2e}"
    grad_out = torch.randn(y_peft.shape, generator=gen, dtype=torch.float64).to(dtype)
    y_fused.backward(grad_out)
    y_peft.backward(grad_out)
    err = rel_err(x_fused.grad, x_peft.grad)
    assert err < tol, f"grad x: relative error {err:.2e}"
    for name, fused in fused_layers.items():
        peft_layer = peft_layers[name]
        # A gradient stored in float32 (the default dtype of the fused lambdas) can be no closer
        # than float32 rounding to PEFT's float64 one.
        lambda_tol = max(tol, 1e-6) if fused.lambda_d.dtype == torch.float32 else tol
        for mine, theirs, label in (
            (fused.lambda_d.grad, peft_layer.vera_lambda_d["default"].grad, "lambda_d"),
            (fused.lambda_b.grad, peft_layer.vera_lambda_b["default"].grad, "lambda_b"),
        ):
            assert mine is not None and theirs is not None, f"{name}.{label}: no gradient"
            assert mine.dtype == fused.lambda_d.dtype
            err = rel_err(mine, theirs)
            assert err < lambda_tol, f"{name}.{label} grad: relative error {err:.2e}"


# ------------------------------------------------------------------------------ PEFT parity


@pytest.mark.parametrize(
    "dtype,lambda_dtype,tol",
    [(torch.float32, torch.float32, 1e-5), (torch.float64, torch.float32, 1e-10), (torch.float64, torch.float64, 1e-10)],
    ids=["fp32", "fp64-lambdas32", "fp64-lambdas64"],
)
def test_matches_peft_two_layers_shared_projections(backend, gen, dtype, lambda_dtype, tol):
    torch.manual_seed(0)
    base = TwoLayers().to(dtype)
    fused_model = copy.deepcopy(base)
    peft_model = peft.get_peft_model(copy.deepcopy(base), _vera_config(["lin1", "lin2"]))
    peft_layers = _peft_layers(peft_model, ["lin1", "lin2"])

    # PEFT sizes its shared projections by the largest in / out over the targeted layers.
    max_in = max(base.lin1.in_features, base.lin2.in_features)
    max_out = max(base.lin1.out_features, base.lin2.out_features)
    projections = VeRAProjections(R, max_in, max_out, SEED, dtype=dtype)
    fused_layers = {
        "lin1": FusedVeRALinear(fused_model.lin1, R, projections=projections),
        "lin2": FusedVeRALinear(fused_model.lin2, R, projections=projections),
    }
    fused_model.lin1, fused_model.lin2 = fused_layers["lin1"], fused_layers["lin2"]
    for layer in fused_layers.values():
        # The layer's default: float32 lambdas, float64 for a float64 base layer.
        default = torch.float64 if dtype == torch.float64 else torch.float32
        assert layer.lambda_d.dtype == layer.lambda_b.dtype == default
        if lambda_dtype != default:  # float32 lambdas beside a float64 layer: the op accepts them
            for param in (layer.lambda_d, layer.lambda_b):
                param.data = param.data.to(lambda_dtype)

    peft_A = peft_model.base_model.vera_A["default"]
    peft_B = peft_model.base_model.vera_B["default"]
    assert peft_A.shape == projections.vera_A.shape == (R, 70)
    assert peft_B.shape == projections.vera_B.shape == (70, R)
    assert torch.equal(projections.vera_A, peft_A)
    assert torch.equal(projections.vera_B, peft_B)
    for layer in fused_layers.values():  # both layers really share one pair of buffers
        assert layer.projections is projections

    _randomize_lambdas(fused_layers, peft_layers, gen)
    _compare_outputs_and_grads(fused_model, peft_model, fused_layers, peft_layers, gen, dtype, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_matches_peft_single_layer_own_projections(backend, gen, dtype, tol):
    """Built without ``projections=``: the layer draws its own from the seed, exactly like PEFT."""
    torch.manual_seed(1)
    base = OneLayer().to(dtype)
    peft_model = peft.get_peft_model(copy.deepcopy(base), _vera_config(["lin1"]))
    peft_layers = _peft_layers(peft_model, ["lin1"])
    fused_model = copy.deepcopy(base)
    fused = FusedVeRALinear(fused_model.lin1, R, projection_seed=SEED)
    fused_model.lin1 = fused

    assert fused.projections.vera_A.dtype == dtype
    assert torch.equal(fused.projections.vera_A, peft_model.base_model.vera_A["default"])
    assert torch.equal(fused.projections.vera_B, peft_model.base_model.vera_B["default"])

    _randomize_lambdas({"lin1": fused}, peft_layers, gen)
    _compare_outputs_and_grads(fused_model, peft_model, {"lin1": fused}, peft_layers, gen, dtype, tol)


def test_initial_lambdas_match_peft(gen):
    """Same initialisation as PEFT for the same d_initial: lambda_d = d_initial, lambda_b = 0."""
    base = OneLayer()
    peft_model = peft.get_peft_model(copy.deepcopy(base), _vera_config(["lin1"]))
    peft_layer = _peft_layers(peft_model, ["lin1"])["lin1"]
    fused = FusedVeRALinear(copy.deepcopy(base.lin1), R, projection_seed=SEED, d_initial=0.1)
    assert torch.equal(fused.lambda_d.detach(), peft_layer.vera_lambda_d["default"].detach())
    assert torch.equal(fused.lambda_b.detach(), peft_layer.vera_lambda_b["default"].detach())


def test_half_precision_layer_against_reference(backend, gen):
    """fp16 base layer and projections, float32 lambdas (as the layer keeps them)."""
    torch.manual_seed(2)
    layer = FusedVeRALinear(nn.Linear(70, 45).half(), 8, projection_seed=SEED)
    assert layer.lambda_d.dtype == layer.lambda_b.dtype == torch.float32
    with torch.no_grad():
        layer.lambda_d.copy_(torch.randn(8, generator=gen))
        layer.lambda_b.copy_(torch.randn(45, generator=gen))
    x = torch.randn(2, 19, 70, generator=gen).half()
    y = layer(x)
    assert y.dtype == torch.float16
    A, B = layer.projection_slices()
    d64 = layer.lambda_d.detach().double().requires_grad_(True)
    b64 = layer.lambda_b.detach().double().requires_grad_(True)
    y_ref = lowrank_linear_reference(
        x.double(), layer.base_layer.weight.double(), layer.base_layer.bias.double(), A.double(), B.double(), d64, b64
    )
    assert rel_err(y, y_ref) < 5e-3
    grad_out = torch.randn(y.shape, generator=gen).half()
    y.backward(grad_out)
    y_ref.backward(grad_out.double())
    assert rel_err(layer.lambda_d.grad, d64.grad) < 5e-3
    assert rel_err(layer.lambda_b.grad, b64.grad) < 5e-3


# --------------------------------------------------------------------------- module behaviour
# (Initial output, trainable parameters, merge / unmerge in fp32 and fp64, construction errors,
# the forward's input check and extra_repr: tests/test_adapter_contract.py, for every adapter.)


def test_projections_are_buffers_left_out_of_checkpoints():
    layer = FusedVeRALinear(nn.Linear(70, 45), R, projection_seed=SEED)
    # the projections are buffers, left out of checkpoints (the seed regenerates them)
    assert {name for name, _ in layer.named_buffers()} == {"projections.vera_A", "projections.vera_B"}
    assert set(layer.state_dict()) == {"lambda_d", "lambda_b", "base_layer.weight", "base_layer.bias"}


# ------------------------------------------------------------------------------- validation


def test_rejects_too_small_projections():
    projections = VeRAProjections(4, 10, 10)
    with pytest.raises(ValueError, match=r"rank 4, max_in_features 10, max_out_features 10") as info:
        FusedVeRALinear(nn.Linear(70, 45), 8, projections=projections)
    assert "r=8, in_features=70, out_features=45" in str(info.value)


@pytest.mark.parametrize("shape", [(16, 60, 70), (16, 70, 40), (8, 70, 70)], ids=["narrow", "short", "low-rank"])
def test_rejects_projections_too_small_in_one_dim(shape):
    with pytest.raises(ValueError, match="smaller than a layer"):
        FusedVeRALinear(nn.Linear(70, 45), R, projections=VeRAProjections(*shape))


def test_rejects_projections_of_other_dtype():
    with pytest.raises(ValueError, match="float64"):
        FusedVeRALinear(nn.Linear(70, 45), R, projections=VeRAProjections(R, 70, 45, dtype=torch.float64))


def test_rejects_bad_projection_sizes():
    with pytest.raises(ValueError, match="max_in_features"):
        VeRAProjections(4, -1, 10)
    with pytest.raises(ValueError, match="r must be"):
        VeRAProjections(0, 4, 10)


def test_projections_repr():
    layer = FusedVeRALinear(nn.Linear(70, 45), 8, projection_seed=SEED)
    assert "max_in_features=70" in repr(layer.projections) and f"seed={SEED}" in repr(layer.projections)


# ------------------------------------------------------------------ shared projections, bad arguments


def test_half_on_one_layer_leaves_the_others_working(backend, gen):
    """``.half()`` on one layer converts the projections every layer shares (as in PEFT); the other
    (fp32) layers keep working, each casting its slices to its own dtype (once: an error about
    ``A``, a name the user never saw)."""
    import pefttriton

    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 8))
    pefttriton.inject(model, pefttriton.VeRAConfig(r=4, target_modules=["0", "1"]))
    with torch.no_grad():
        for layer in (model[0], model[1]):
            layer.lambda_b.copy_(torch.randn(layer.out_features, generator=gen))
    x = torch.randn(3, 10, generator=gen)
    before = model[1](x)
    model[0].half()
    assert model[1].projections.vera_A.dtype == torch.float16  # shared: converted for both
    after = model[1](x)
    assert after.dtype == torch.float32
    assert rel_err(after, before) < 2e-3  # only the fp16 rounding of the projections changed it
    assert model[0](torch.randn(3, 12, generator=gen).half()).dtype == torch.float16


@pytest.mark.parametrize("seed", ["a", 1.5, True, None])
def test_projection_seed_must_be_int(seed):
    with pytest.raises(TypeError, match="seed"):
        VeRAProjections(4, 8, 8, seed=seed)


@pytest.mark.parametrize("d_initial", ["a", float("nan"), None])
def test_d_initial_must_be_finite_float(d_initial):
    with pytest.raises(ValueError, match="d_initial"):
        FusedVeRALinear(nn.Linear(8, 6), 4, d_initial=d_initial)


def test_d_initial_is_kept():
    layer = FusedVeRALinear(nn.Linear(8, 6), 4, d_initial=0.25)
    assert layer.d_initial == 0.25 and torch.equal(layer.lambda_d.detach(), torch.full((4,), 0.25))
    assert "d_initial=0.25" in repr(layer)
