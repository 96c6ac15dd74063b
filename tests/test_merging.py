"""Merging: ``safe_merge`` refuses broken adapters, and tied weights are never changed behind the user's back."""

import copy
import warnings

import pytest
import torch
from conftest import rel_err
from test_inject import model_output, tiny_gpt2, token_ids
from torch import nn

import pefttriton
from pefttriton import LoRAConfig, inject, merge_and_unload

LAYERS = {
    "vera": lambda base: pefttriton.FusedVeRALinear(base, 4),
    "lora": lambda base: pefttriton.FusedLoRALinear(base, 4),
    "deep_lora": lambda base: pefttriton.FusedDeepLoRALinear(base, 4),
    "lorma_plus": lambda base: pefttriton.FusedLoRMALinear(base, 4, variant="plus"),
    "lorma_pi": lambda base: pefttriton.FusedLoRMALinear(base, 4, variant="pi"),
}


def _break(layer):
    """Put a NaN into the first trainable adapter tensor."""
    with torch.no_grad():
        next(p for p in layer.parameters() if p.requires_grad).view(-1)[0] = float("nan")


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_safe_merge_refuses_nan_and_leaves_weight(kind):
    layer = LAYERS[kind](nn.Linear(8, 6))
    _break(layer)
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged
    layer.merge()  # without safe_merge it merges, as PEFT does
    assert layer.merged and not torch.isfinite(layer.base_layer.weight).all()


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_safe_merge_passes_finite_adapters(gen, kind):
    layer = LAYERS[kind](nn.Linear(8, 6))
    x = torch.randn(3, 8, generator=gen)
    expected = layer(x).detach()
    layer.merge(safe_merge=True)
    assert rel_err(layer(x), expected) < 1e-5


def test_merge_and_unload_safe_merge_changes_nothing_on_failure(gen):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    inject(model, LoRAConfig(r=2, target_modules=["0", "1"]))
    _break(model[1])
    snapshot = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="'1'"):
        merge_and_unload(model, safe_merge=True)
    assert all(isinstance(m, pefttriton.FusedLoRALinear) and not m.merged for m in model)
    for name, p in model.named_parameters():
        assert torch.equal(p, snapshot[name]) or (p.isnan() == snapshot[name].isnan()).all(), name


def test_tied_lm_head_warns_at_inject_and_merges_without_touching_the_embedding(gen):
    """GPT-2 ties lm_head to wte. Merging once wrote the adapter into the shared tensor, changing
    the embedding too (logits off by up to 58). Now: a warning at inject, and merging unties."""
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.warns(UserWarning, match="tied"):
        inject(model, LoRAConfig(r=4, target_modules=["lm_head"]))
    assert model.lm_head.tied_weight_names == ["transformer.wte.weight"]
    with torch.no_grad():
        model.lm_head.lora_B.copy_(torch.randn(model.lm_head.lora_B.shape, generator=gen))
    ids = token_ids(gen)
    adapted = model_output(model, ids).detach()
    embedding = model.transformer.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match="no longer tied"):
        merge_and_unload(model)
    assert torch.equal(model.transformer.wte.weight, embedding)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert rel_err(model_output(model, ids), adapted) < 1e-5


def test_untied_targets_do_not_warn():
    model = tiny_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject(copy.deepcopy(model), LoRAConfig(r=4, target_modules=["c_attn"]))
