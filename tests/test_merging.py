"""Merging models: ``merge_and_unload(safe_merge=True)`` refuses broken adapters, and tied weights
are never changed behind the user's back.

(Each layer's own ``merge(safe_merge=True)``, refusing NaN and passing finite adapters, is in
tests/test_adapter_contract.py, for every adapter.)
"""

import copy
import warnings

import pytest
import torch
from helpers import model_output, rel_err, tiny_gpt2, token_ids
from torch import nn

import pefttriton
from pefttriton import LoRAConfig, inject, merge_and_unload


def _break(layer):
    """Put a NaN into the first trainable adapter tensor."""
    with torch.no_grad():
        next(p for p in layer.parameters() if p.requires_grad).view(-1)[0] = float("nan")


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
