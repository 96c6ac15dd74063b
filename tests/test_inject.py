"""``pefttriton.inject`` / ``merge_and_unload`` / the parameter summary on transformers models.

Models are built from tiny configs with random weights (no downloads) and odd sizes: Llama
(hidden 30, MLP 45, k/v 10), GPT-2 (its Conv1D layers), BERT and RoBERTa. Every fused model is
checked against a float64 copy of the base model in which each adapted layer is replaced by a
plainly written reference module (ordinary autograd), outputs and adapter gradients.
"""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import VOCAB, model_output, randomize_adapters, rel_err, tiny_encoder, tiny_gpt2, tiny_llama, token_ids
from peft.tuners.vera.model import _kaiming_init
from torch import nn
from transformers.pytorch_utils import Conv1D

from pefttriton.adapters.config import DeepLoRAConfig, LoRAConfig, LoRMAConfig, VeRAConfig
from pefttriton.integration.injection import inject, merge_and_unload, trainable_parameter_summary
from pefttriton.adapters.registry import config_from_dict
from pefttriton.integration.surgery import adapter_layers, matches
from pefttriton.adapters.lora import FusedLoRALinear
from pefttriton.adapters.vera import FusedVeRALinear, VeRAProjections

# ----------------------------------------------------------------------------- PEFT's projections


def peft_projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's own draw (peft.tuners.vera.model._kaiming_init), A first, from one CPU generator."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    A = _kaiming_init((r, max_in), generator=generator)
    B = _kaiming_init((max_out, r), generator=generator)
    return A, B


# ----------------------------------------------------------------------------- float64 references


class RefAdapted(nn.Module):
    """``y = x W^T + bias + delta(x)``, float64, plain autograd; ``W`` (out, in) frozen."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.detach().double().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().double().clone())

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.delta(x)


class RefVeRA(RefAdapted):
    def __init__(self, weight, bias, A, B, lambda_d, lambda_b):
        super().__init__(weight, bias)
        self.register_buffer("A", A.double().clone())
        self.register_buffer("B", B.double().clone())
        self.lambda_d = nn.Parameter(lambda_d.detach().double().clone())
        self.lambda_b = nn.Parameter(lambda_b.detach().double().clone())

    def delta(self, x):
        return self.lambda_b * F.linear(self.lambda_d * F.linear(x, self.A), self.B)


class RefLoRA(RefAdapted):
    def __init__(self, weight, bias, lora_A, lora_B, scale):
        super().__init__(weight, bias)
        self.lora_A = nn.Parameter(lora_A.detach().double().clone())
        self.lora_B = nn.Parameter(lora_B.detach().double().clone())
        self.scale = scale

    def delta(self, x):
        return self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


class RefDeepLoRA(RefAdapted):
    def __init__(self, weight, bias, W1, W2, W3):
        super().__init__(weight, bias)
        self.W1, self.W2, self.W3 = (nn.Parameter(t.detach().double().clone()) for t in (W1, W2, W3))

    def delta(self, x):
        return F.linear(F.linear(F.linear(x, self.W1), self.W2), self.W3)


def base_weight_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) weight and bias of a plain nn.Linear or GPT-2 Conv1D (weight stored (in, out))."""
    if isinstance(module, Conv1D):
        return module.weight.T, module.bias
    return module.weight, module.bias


def reference_model(base: nn.Module, fused: nn.Module, A_full=None, B_full=None) -> nn.Module:
    """A float64 copy of ``base`` with each layer that ``fused`` adapts replaced by a reference module
    holding the fused layer's adapter values (and, for VeRA, slices of ``A_full`` / ``B_full``)."""
    ref = copy.deepcopy(base).double().requires_grad_(False)
    for name, layer in adapter_layers(fused):
        weight, bias = base_weight_bias(base.get_submodule(name))
        if isinstance(layer, FusedVeRALinear):
            n, m, r = layer.in_features, layer.out_features, layer.r
            new = RefVeRA(weight, bias, A_full[:r, :n], B_full[:m, :r], layer.lambda_d, layer.lambda_b)
        elif isinstance(layer, FusedLoRALinear):
            new = RefLoRA(weight, bias, layer.lora_A, layer.lora_B, layer.alpha / layer.r)
        else:
            new = RefDeepLoRA(weight, bias, layer.W1, layer.W2, layer.W3)
        parent_name, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent_name), child, new)
    return ref


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the adapter parameters keyed ``<layer>.<param>`` (same keys for fused and reference)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            out[name] = p.grad
    return out


def check_against_reference(fused, ref, ids, gen, tol_out, tol_grad):
    y = model_output(fused, ids)
    y_ref = model_output(ref, ids)
    err = rel_err(y, y_ref)
    assert err < tol_out, f"output: relative error {err:.2e}"
    w = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    (y * w.to(y.dtype)).sum().backward()
    (y_ref * w).sum().backward()
    grads, grads_ref = adapter_grads(fused), adapter_grads(ref)
    assert grads and set(grads) == set(grads_ref), (sorted(grads), sorted(grads_ref))
    for key in grads:
        err = rel_err(grads[key], grads_ref[key])
        assert err < tol_grad, f"grad {key}: relative error {err:.2e}"


# ----------------------------------------------------------------------------- VeRA on Llama


@pytest.mark.parametrize("r", [1, 5])
def test_vera_llama_against_float64_reference(backend, gen, r):
    base = tiny_llama()
    model = inject(copy.deepcopy(base), VeRAConfig(r=r, target_modules=["q_proj", "v_proj", "down_proj"], projection_seed=7))
    names = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    layers = dict(adapter_layers(model))
    assert sorted(layers) == sorted(names)
    # One shared pair sized to the largest adapted layer (PEFT's _find_dim): in 45 (down_proj), out 30.
    projections = {id(layer.projections) for layer in layers.values()}
    assert len(projections) == 1
    shared = next(iter(layers.values())).projections
    assert tuple(shared.vera_A.shape) == (r, 45) and tuple(shared.vera_B.shape) == (30, r)
    A_full, B_full = peft_projections(7, r, 45, 30)
    assert torch.equal(shared.vera_A, A_full) and torch.equal(shared.vera_B, B_full)
    # Only the vectors train.
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.{v}" for n in names for v in ("lambda_b", "lambda_d"))
    # At init lambda_b = 0: the model computes exactly what the base model computes.
    ids = token_ids(gen)
    with torch.no_grad():
        err = rel_err(model_output(model, ids), model_output(base, ids))
    assert err < 1e-6, err
    randomize_adapters(model, gen)
    ref = reference_model(base, model, A_full, B_full)
    check_against_reference(model, ref, ids, gen, tol_out=1e-5, tol_grad=1e-4)


def test_vera_summary_counts(gen):
    model = inject(tiny_llama(), VeRAConfig(r=5, target_modules=["q_proj", "v_proj", "down_proj"]))
    summary = trainable_parameter_summary(model)
    # Per layer r + out_features: q 5+30, v 5+10, down 5+30, two decoder layers.
    assert summary.adapter == 2 * (35 + 15 + 35)
    assert summary.per_layer["model.layers.0.self_attn.v_proj"] == 15
    assert summary.other_trainable == 0 and summary.trainable == summary.adapter
    base_params = sum(p.numel() for p in tiny_llama().parameters())
    assert summary.total == base_params + summary.adapter
    assert summary.projection_entries == 5 * 45 + 30 * 5
    model.lm_head.weight.requires_grad_(True)  # a head unfrozen by hand counts as "other"
    summary = trainable_parameter_summary(model)
    assert summary.other_trainable == VOCAB * 30
    text = str(summary)
    assert f"adapters {2 * 85:,}" in text and "all params" in text


# ----------------------------------------------------------------------------- GPT-2 (Conv1D)


def test_gpt2_conv1d_vera_and_merge(backend, gen):
    base = tiny_gpt2()
    model = inject(copy.deepcopy(base), VeRAConfig(r=3, target_modules=["c_attn", "c_proj", "c_fc"], projection_seed=3))
    layers = dict(adapter_layers(model))
    assert len(layers) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    for name, layer in layers.items():
        conv = base.get_submodule(name)
        assert isinstance(conv, Conv1D) and layer.fan_in_fan_out
        # the nn.Linear the engine sees holds W = conv.weight.T, row-major
        assert torch.equal(layer.base_layer.weight, conv.weight.T) and layer.base_layer.weight.is_contiguous()
    shared = next(iter(layers.values())).projections
    assert tuple(shared.vera_A.shape) == (3, 112) and tuple(shared.vera_B.shape) == (112, 3)
    A_full, B_full = peft_projections(3, 3, 112, 112)
    randomize_adapters(model, gen)
    ids = token_ids(gen)
    ref = reference_model(base, model, A_full, B_full)
    check_against_reference(model, ref, ids, gen, tol_out=1e-5, tol_grad=1e-4)

    # merge_and_unload: Conv1D layers again, holding (W0 + delta)^T; same outputs.
    with torch.no_grad():
        y_fused = model_output(model, ids)
        deltas = {name: layer.delta_weight().double() for name, layer in layers.items()}
        merge_and_unload(model)
        y_merged = model_output(model, ids)
    assert not adapter_layers(model)
    for name, delta in deltas.items():
        conv = model.get_submodule(name)
        assert isinstance(conv, Conv1D)
        expected = base.get_submodule(name).weight.double() + delta.T
        assert rel_err(conv.weight, expected) < 1e-6
    assert rel_err(y_merged, y_fused) < 1e-5


def test_gpt2_conv1d_lora(backend, gen):
    base = tiny_gpt2()
    model = inject(copy.deepcopy(base), LoRAConfig(r=3, lora_alpha=5.0, target_modules=["c_attn"]))
    assert all(layer.fan_in_fan_out for _, layer in adapter_layers(model))
    randomize_adapters(model, gen)
    ref = reference_model(base, model)
    check_against_reference(model, ref, token_ids(gen), gen, tol_out=1e-5, tol_grad=1e-4)


# ----------------------------------------------------------------------------- BERT / RoBERTa


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoders_regex_targets_lora(backend, gen, family):
    base = tiny_encoder(family)
    regex = r".*attention\.self\.(query|value)"
    model = inject(copy.deepcopy(base), LoRAConfig(r=3, lora_alpha=6.0, target_modules=regex))
    names = sorted(name for name, _ in adapter_layers(model))
    assert names == sorted(f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value"))
    # The list form selects the same layers.
    listed = inject(copy.deepcopy(base), LoRAConfig(r=3, target_modules=["query", "value"]))
    assert sorted(name for name, _ in adapter_layers(listed)) == names
    randomize_adapters(model, gen)
    ref = reference_model(base, model)
    check_against_reference(model, ref, token_ids(gen), gen, tol_out=1e-5, tol_grad=1e-4)


# ----------------------------------------------------------------------------- other adapters


def test_deep_lora_llama(backend, gen):
    base = tiny_llama()
    model = inject(copy.deepcopy(base), DeepLoRAConfig(r=3, eps=0.3, target_modules=["o_proj", "up_proj"]))
    layers = dict(adapter_layers(model))
    assert len(layers) == 4 and all(layer.eps == 0.3 for layer in layers.values())
    summary = trainable_parameter_summary(model)
    # W1 (r, in) + W2 (r, r) + W3 (out, r): o_proj 30x30, up_proj 45x30.
    assert summary.adapter == 2 * ((3 * 30 + 9 + 30 * 3) + (3 * 30 + 9 + 45 * 3))
    randomize_adapters(model, gen)
    ref = reference_model(base, model)
    check_against_reference(model, ref, token_ids(gen), gen, tol_out=1e-5, tol_grad=1e-4)


# (merge_and_unload for every adapter, nn.Linear and Conv1D, with a layer already merged:
# tests/test_adapter_contract.py::test_inject_and_merge_and_unload.)


def test_two_injections_keep_both_adapters_trainable(gen):
    model = inject(tiny_llama(), VeRAConfig(r=4, target_modules=["q_proj"]))
    inject(model, LoRAConfig(r=2, target_modules=["up_proj"]))
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lambda_d", "lambda_b", "lora_A", "lora_B"}
    assert trainable_parameter_summary(model).adapter == 2 * (4 + 30) + 2 * (2 * 30 + 45 * 2)


# ----------------------------------------------------------------------------- matching rules


def test_matching_follows_peft_rules():
    cfg = VeRAConfig(r=2, target_modules=["q_proj", "mlp.up_proj"])
    assert matches(cfg, "model.layers.0.self_attn.q_proj")
    assert matches(cfg, "q_proj")  # the full name itself
    assert matches(cfg, "model.layers.1.mlp.up_proj")
    assert not matches(cfg, "model.layers.0.self_attn.xq_proj")  # suffix must follow a dot
    assert not matches(cfg, "model.layers.0.self_attn.q_proj.base_layer")
    regex = VeRAConfig(r=2, target_modules=r"model\.layers\.1\..*proj")
    assert matches(regex, "model.layers.1.mlp.down_proj")
    assert not matches(regex, "model.layers.10.mlp.down_proj")  # fullmatch, not search
    assert not matches(regex, "x.model.layers.1.mlp.down_proj")
    excl = VeRAConfig(r=2, target_modules=["q_proj", "v_proj"], exclude_modules=["layers.1.self_attn.v_proj"])
    assert matches(excl, "model.layers.0.self_attn.v_proj")
    assert not matches(excl, "model.layers.1.self_attn.v_proj")
    model = inject(tiny_llama(), excl)
    assert len(adapter_layers(model)) == 3


def test_inject_errors():
    with pytest.raises(ValueError, match="matched no"):
        inject(tiny_llama(), VeRAConfig(r=2, target_modules=["nonexistent"]))
    with pytest.raises(TypeError, match="LlamaAttention"):
        inject(tiny_llama(), VeRAConfig(r=2, target_modules=["self_attn"]))
    model = inject(tiny_llama(), VeRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already holds"):
        inject(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="config must be"):
        inject(tiny_llama(), {"r": 2})
    with pytest.raises(TypeError, match="model must be"):
        inject("model", VeRAConfig(r=2, target_modules=["q_proj"]))
    mixed = tiny_llama()
    mixed.model.layers[1].self_attn.q_proj.double()
    with pytest.raises(ValueError, match="share dtype and device"):
        inject(mixed, VeRAConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: VeRAConfig(r=0, target_modules=["q"]), "r must be a positive int"),
        (lambda: VeRAConfig(r=2, target_modules=None), "target_modules"),
        (lambda: VeRAConfig(r=2, target_modules=["q"], d_initial=math.nan), "d_initial"),
        (lambda: LoRAConfig(r=2, target_modules=["q"], lora_dropout=1.0), "lora_dropout"),
        (lambda: DeepLoRAConfig(r=2, target_modules=["q"], eps=-1.0), "eps"),
        (lambda: LoRMAConfig(r=2, target_modules=["q"], variant="times"), "variant"),
    ],
)
def test_config_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_config_names_and_round_trip():
    cfg = VeRAConfig(r=3, target_modules={"v_proj", "q_proj"}, projection_seed=11)
    assert cfg.target_modules == ["q_proj", "v_proj"]  # sets become sorted lists (JSON-friendly)
    assert cfg.projection_prng_key == 11  # PEFT's name
    cfg.projection_prng_key = 12
    assert cfg.projection_seed == 12
    assert config_from_dict(cfg.to_dict()) == cfg
    lora = LoRAConfig(r=4, lora_alpha=16, target_modules=re.escape("a.b"))
    assert config_from_dict(lora.to_dict()) == lora
    with pytest.raises(TypeError, match="target_modules"):
        VeRAConfig(r=2, target_modules=[1, 2])


def test_shared_projections_one_module():
    model = inject(tiny_llama(), VeRAConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    projections = [m for m in model.modules() if isinstance(m, VeRAProjections)]
    assert len(projections) == 1  # model.modules() deduplicates: one shared object
    # non-persistent buffers: the model's state dict does not grow by the projections
    assert not any("vera_A" in key or "vera_B" in key for key in model.state_dict())


def test_no_public_name_shadows_a_module():
    """``pefttriton.<name>`` never hides the submodule ``pefttriton/<name>.py`` (the function
    ``inject`` once shadowed the module ``pefttriton.inject``)."""
    import importlib
    import pkgutil
    import types

    import pefttriton

    for info in pkgutil.iter_modules(pefttriton.__path__):
        module = importlib.import_module(f"pefttriton.{info.name}")
        attr = getattr(pefttriton, info.name, module)
        assert attr is module, f"pefttriton.{info.name} is a {type(attr).__name__}, not the module"
        assert isinstance(attr, types.ModuleType)


# ------------------------------------------------------------------------------ modules_to_save


class _WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Sequential(nn.Linear(8, 3))
        self.other = nn.Linear(8, 8)

    def forward(self, x):
        return self.head(self.other(self.body(x)))


def test_modules_to_save_train_beside_the_adapters():
    from pefttriton.integration.surgery import modules_to_save

    model = inject(_WithHead(), LoRAConfig(r=2, target_modules=["body"], modules_to_save=["head"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"body.lora_A", "body.lora_B", "head.0.weight", "head.0.bias"}
    assert modules_to_save(model) == ["head"]
    inject(model, VeRAConfig(r=2, target_modules=["other"]))  # a later inject keeps the head trainable
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"head.0.weight", "head.0.bias", "other.lambda_d", "other.lambda_b"} <= trainable
    merge_and_unload(model)
    assert modules_to_save(model) == []


def test_modules_to_save_errors():
    with pytest.raises(ValueError, match="matches no module"):
        inject(_WithHead(), LoRAConfig(r=2, target_modules=["body"], modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="target_modules adapts"):
        inject(_WithHead(), LoRAConfig(r=2, target_modules=["0"], modules_to_save=["head"]))
    with pytest.raises(TypeError, match="modules_to_save"):
        LoRAConfig(r=2, target_modules=["body"], modules_to_save="head")


def test_inject_keeps_eval_mode(gen):
    """A model in eval mode gets its new layers in eval mode: LoRA dropout is then off."""
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    inject(model, LoRAConfig(r=2, lora_dropout=0.5, target_modules=["0"]))
    assert not model[0].training and not model[0].lora_dropout.training
    with torch.no_grad():
        model[0].lora_B.fill_(1.0)
    x = torch.randn(4, 8, generator=gen)
    assert torch.equal(model(x), model(x))
