"""PEFT interop: which layers and modules PEFT ends up with, checked against PEFT itself.

* Export names exactly the adapted layers (``target_modules``, ``rank_pattern``,
  ``alpha_pattern``), also when one layer's name is a suffix of another's (``lin1``, ``sub.lin1``).
* ``from_peft_model`` with one of several adapters leaves no PEFT module behind and computes what
  PEFT computes after ``set_adapter``.
* ``modules_to_save`` (a trained classification head) crosses both ways: PEFT ``SEQ_CLS``
  fine-tunes into fused layers, fused fine-tunes into ``PeftModel.from_pretrained``.
* VeRA's ``save_projection`` and ``d_initial`` are read and written as PEFT reads and writes them.

Reference outputs always come from PEFT's own layers. Fused against PEFT differs by the summation
order of the fused engine (see ``test_peft_interop.py``), so those comparisons use ``TOL``.
"""

import copy
import json
import shutil
import warnings

import pytest
import torch
from helpers import model_output, rel_err, tiny_gpt2, tiny_llama, token_ids
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from pefttriton import merge_and_unload
from pefttriton.adapters.config import LoRAConfig as FusedLoRAConfig, VeRAConfig as FusedVeRAConfig
from pefttriton.integration.injection import inject
from pefttriton.integration.surgery import adapter_layers, modules_to_save
from pefttriton.adapters.lora import FusedLoRALinear
from pefttriton.integration.peft_interop import (
    PEFT_LAYER_SUBMODULES,
    from_peft_model,
    load_peft_adapter,
    save_peft_adapter,
)
from pefttriton.adapters.vera import FusedVeRALinear

TOL = 1e-5


class quiet:
    """Silences warnings: PEFT warns about save_projection=False, modules_to_save and more, none of it under test here."""

    def __enter__(self):
        self._context = warnings.catch_warnings()
        self._context.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def _peft_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every PEFT module (tuner layer or training wrapper) of ``model``, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))}


def _tuner_layers(peft_model) -> dict[str, BaseTunerLayer]:
    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, BaseTunerLayer)}


def _wrapped_modules(peft_model) -> list[str]:
    """Names of the modules PEFT wraps as modules_to_save."""
    return sorted(n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, ModulesToSaveWrapper))


def _randomize(model: nn.Module, gen: torch.Generator, scale: float = 0.5) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def test_peft_layer_submodules_are_pefts():
    """The sub-module names the export checks modules_to_save entries against are PEFT's own."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    for kind, cfg in (("lora", LoraConfig(r=2, target_modules=["a"])), ("vera", VeraConfig(r=2, target_modules=["a"]))):
        with quiet():
            pm = get_peft_model(Two(), cfg)
        names = [n[2:] for n, _ in pm.base_model.model.named_modules() if n.startswith("a.")]
        assert tuple(names) == PEFT_LAYER_SUBMODULES[kind], kind


# ----------------------------------------------------------------------------- 3: exact target names


class _Sub(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(8, 12)


class _Net(nn.Module):
    """``sub.lin1`` ends with ``lin1``; ``sub`` and ``head`` come first in ``named_modules``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.sub = _Sub()
        self.head = nn.Linear(12, 3)
        self.lin1 = nn.Linear(6, 8)

    def forward(self, x):
        return self.head(torch.relu(self.sub.lin1(torch.relu(self.lin1(x)))))


def _fused_net(case: str, gen) -> nn.Module:
    net = _Net()
    if case.startswith("vera"):
        # A regex: pefttriton's list rule would match sub.lin1 as well, as PEFT's does.
        inject(net, FusedVeRAConfig(r=4, target_modules="lin1", projection_seed=3))
    elif case == "lora-lin1-and-head":
        inject(net, FusedLoRAConfig(r=2, lora_alpha=4, target_modules="head"))
        inject(net, FusedLoRAConfig(r=3, lora_alpha=5, target_modules="lin1"))  # rank and alpha patterns
    else:  # both lin1 layers, different ranks: only the rank_pattern keys tell them apart
        inject(net, FusedLoRAConfig(r=2, lora_alpha=4, target_modules=["sub.lin1", "head"]))
        inject(net, FusedLoRAConfig(r=3, lora_alpha=5, target_modules="lin1"))
    _randomize(net, gen)
    return net


@pytest.mark.parametrize("case", ["vera-save-projection", "vera-from-seed", "lora-lin1-and-head", "lora-both-lin1"])
def test_export_adapts_exactly_the_fused_layers(tmp_path, gen, case):
    fused = _fused_net(case, gen)
    save_peft_adapter(fused, tmp_path, save_projection=case != "vera-from-seed")
    with quiet():
        reloaded = PeftModel.from_pretrained(_Net(), tmp_path).eval()
    layers = _tuner_layers(reloaded)
    ours = dict(adapter_layers(fused))
    assert sorted(layers) == sorted(ours)  # no extra PEFT adapter on sub.lin1
    for name, layer in ours.items():
        pl = layers[name]
        if isinstance(layer, FusedVeRALinear):
            assert torch.equal(pl.vera_lambda_b["default"], layer.lambda_b)
            A, _ = layer.projection_slices()
            assert torch.equal(pl.vera_A["default"][: layer.r, : layer.in_features], A)
        else:
            assert pl.r["default"] == layer.r and pl.scaling["default"] == layer.scale
            assert torch.equal(pl.lora_A["default"].weight, layer.lora_A)
    x = torch.randn(5, 6, generator=gen)
    with torch.no_grad():
        assert rel_err(fused(x), reloaded(x)) < TOL


# ----------------------------------------------------------------------------- 4: one adapter of several


def _two_adapter_llama(kind: str, gen):
    base = tiny_llama()
    if kind == "lora":
        first = LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], modules_to_save=["model.norm"])
        second = LoraConfig(r=3, lora_alpha=2, target_modules=["v_proj", "o_proj", "up_proj"], modules_to_save=["lm_head"])
    else:
        first = VeraConfig(r=4, target_modules=["q_proj", "v_proj"], projection_prng_key=1, modules_to_save=["model.norm"])
        # not up_proj (30 -> 45): PEFT 0.21 sizes a second VeRA adapter's projections wrongly for it
        second = VeraConfig(r=4, target_modules=["v_proj", "o_proj"], projection_prng_key=1, modules_to_save=["lm_head"])
    with quiet():
        pm = get_peft_model(copy.deepcopy(base), first)
        pm.add_adapter("other", second)
    with torch.no_grad():  # every adapter's tensors and trained copies, active or not
        for name, p in pm.named_parameters():
            if any(s in name for s in ("lora_A", "lora_B", "vera_lambda", "modules_to_save")):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return pm.eval()


@pytest.mark.parametrize("kind", ["lora", "vera"])
@pytest.mark.parametrize("adapter", ["default", "other"])
def test_from_peft_model_one_of_two_adapters(gen, kind, adapter):
    pm = _two_adapter_llama(kind, gen)
    reference = copy.deepcopy(pm)
    reference.set_adapter(adapter)
    holding = sorted(n for n, m in _tuner_layers(pm).items() if adapter in m._get_available_adapters())
    fused = from_peft_model(pm, adapter_name=adapter)
    assert _peft_modules(fused) == {}
    assert sorted(dict(adapter_layers(fused))) == holding
    # q_proj holds only "default", o_proj only "other": the other ones are plain nn.Linear again
    plain = "o_proj" if adapter == "default" else "q_proj"
    assert type(fused.model.layers[0].self_attn.get_submodule(plain)) is nn.Linear
    saved = ["model.norm"] if adapter == "default" else ["lm_head"]
    assert modules_to_save(fused) == saved
    assert all(p.requires_grad for p in fused.get_submodule(saved[0]).parameters())
    assert torch.equal(
        fused.get_submodule(saved[0]).weight,
        reference.base_model.model.get_submodule(saved[0]).modules_to_save[adapter].weight,
    )
    ids = token_ids(gen)
    with torch.no_grad():
        y_peft = model_output(reference, ids)
        assert rel_err(model_output(fused, ids), y_peft) < TOL
        merged = merge_and_unload(fused)
        assert _peft_modules(merged) == {} and adapter_layers(merged) == []
        assert rel_err(model_output(merged, ids), y_peft) < TOL


def test_from_peft_model_other_adapter_keeps_conv1d(gen):
    """GPT-2: a Conv1D holding only the adapter not taken goes back to being a Conv1D."""
    from transformers.pytorch_utils import Conv1D

    with quiet():
        pm = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
        pm.add_adapter("other", LoraConfig(r=3, target_modules=["c_fc"], fan_in_fan_out=True))
    _randomize(pm, gen)  # "default" is active, so its tensors are the trainable ones
    pm.eval()
    reference = copy.deepcopy(pm)
    reference.set_adapter("default")
    fused = from_peft_model(pm, adapter_name="default")
    assert _peft_modules(fused) == {}
    assert type(fused.transformer.h[0].mlp.c_fc) is Conv1D
    assert all(isinstance(layer, FusedLoRALinear) for _, layer in adapter_layers(fused))
    ids = token_ids(gen)
    with torch.no_grad():
        assert rel_err(model_output(fused, ids), model_output(reference, ids)) < TOL


def test_from_peft_model_unknown_adapter(gen):
    pm = _two_adapter_llama("lora", gen)
    with pytest.raises(ValueError, match="adapter_name='nope' is not an adapter"):
        from_peft_model(pm, adapter_name="nope")
    assert len(_peft_modules(pm.base_model.model)) > 0  # unchanged


# ----------------------------------------------------------------------------- 5: modules_to_save


def _tiny_bert_cls() -> nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, num_labels=3
    )
    return BertForSequenceClassification(cfg).eval()


def _train(model: nn.Module, gen: torch.Generator, steps: int = 3) -> None:
    """A few Adam steps on random tokens and labels, so adapters and head move away from their init."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, 99, (4, 7), generator=gen)
        labels = torch.randint(0, 3, (4,), generator=gen)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_cls_config(kind: str):
    if kind == "lora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    return VeraConfig(r=8, target_modules=["query", "value"], projection_prng_key=3, task_type="SEQ_CLS")


@pytest.mark.parametrize("kind", ["lora", "vera"])
def test_peft_seq_cls_fine_tune_into_fused(tmp_path, gen, kind):
    base = _tiny_bert_cls()
    with quiet():
        pm = get_peft_model(copy.deepcopy(base), _peft_cls_config(kind))
    _train(pm, gen)
    head = pm.base_model.model.classifier.modules_to_save["default"]
    assert not torch.equal(head.weight, base.classifier.weight)  # the head really trained
    ids = torch.randint(3, 99, (2, 9), generator=gen)
    y_peft = _logits(pm, ids)
    fused_cls = FusedLoRALinear if kind == "lora" else FusedVeRALinear

    # In, from the live PEFT model.
    fused = from_peft_model(copy.deepcopy(pm))
    assert _peft_modules(fused) == {}
    assert all(isinstance(layer, fused_cls) for _, layer in adapter_layers(fused)) and len(adapter_layers(fused)) == 4
    assert modules_to_save(fused) == ["classifier"]
    assert torch.equal(fused.classifier.weight, head.weight)
    assert all(p.requires_grad for p in fused.classifier.parameters())
    assert rel_err(_logits(fused, ids), y_peft) < TOL

    # In, from PEFT's checkpoint (modules_to_save = ["classifier", "score"], SEQ_CLS).
    with quiet():
        pm.save_pretrained(tmp_path)
    assert "base_model.model.classifier.weight" in load_file(tmp_path / "adapter_model.safetensors")
    with quiet():
        loaded = load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert modules_to_save(loaded) == ["classifier"]
    assert torch.equal(loaded.classifier.weight, head.weight) and torch.equal(loaded.classifier.bias, head.bias)
    assert all(p.requires_grad for p in loaded.classifier.parameters())
    assert rel_err(_logits(loaded, ids), y_peft) < TOL


@pytest.mark.parametrize("kind", ["lora", "vera"])
def test_fused_fine_tune_with_head_into_peft(tmp_path, gen, kind):
    base = _tiny_bert_cls()
    if kind == "lora":
        config = FusedLoRAConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    else:
        config = FusedVeRAConfig(r=8, target_modules=["query", "value"], projection_seed=3, modules_to_save=["classifier"])
    ours = inject(copy.deepcopy(base), config)
    ours.bert.pooler.dense.requires_grad_(True)  # a module unfrozen by hand trains and is exported too
    _train(ours, gen)
    assert not torch.equal(ours.classifier.weight, base.classifier.weight)
    assert not torch.equal(ours.bert.pooler.dense.weight, base.bert.pooler.dense.weight)
    save_peft_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    # "dense" alone would also wrap every attention / MLP dense layer in PEFT
    assert cfg["modules_to_save"] == ["classifier", "pooler.dense"] and cfg["task_type"] is None
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(state["base_model.model.bert.pooler.dense.weight"], ours.bert.pooler.dense.weight)

    with quiet():
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert _wrapped_modules(reloaded) == ["bert.pooler.dense", "classifier"]
    assert sorted(_tuner_layers(reloaded)) == sorted(dict(adapter_layers(ours)))
    ids = torch.randint(3, 99, (2, 9), generator=gen)
    y_ours = _logits(ours, ids)
    assert rel_err(_logits(reloaded, ids), y_ours) < TOL

    # and back into fused layers: the same model again
    with quiet():
        again = load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert sorted(modules_to_save(again)) == ["bert.pooler.dense", "classifier"]
    assert rel_err(_logits(again, ids), y_ours) < TOL


class _TwoHeads(nn.Module):
    """``pre_classifier`` ends with ``classifier``: PEFT cannot wrap the top-level ``classifier`` alone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 6)
        self.pre_classifier = nn.Linear(6, 6)
        self.classifier = nn.Linear(6, 2)

    def forward(self, x):
        return self.classifier(self.pre_classifier(self.body(x)))


def test_export_refuses_modules_to_save_peft_cannot_name(tmp_path):
    # What PEFT does with the only possible entry: it wraps pre_classifier as well.
    with quiet():
        pm = get_peft_model(_TwoHeads(), LoraConfig(r=2, target_modules=["body"], modules_to_save=["classifier"]))
    assert _wrapped_modules(pm) == ["classifier", "pre_classifier"]

    fused = inject(_TwoHeads(), FusedLoRAConfig(r=2, target_modules=["body"], modules_to_save=["classifier"]))
    assert modules_to_save(fused) == ["classifier"]
    with pytest.raises(ValueError, match=r"'classifier' cannot be named in PEFT's modules_to_save.*pre_classifier"):
        save_peft_adapter(fused, tmp_path)
    fused.pre_classifier.requires_grad_(True)  # both heads train: "classifier" names exactly them
    save_peft_adapter(fused, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "pre_classifier"]

    # a trainable base weight of an adapted layer has no place in PEFT's format
    fused.pre_classifier.requires_grad_(False)
    fused.body.base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="lies inside the adapted layer 'body'"):
        save_peft_adapter(fused, tmp_path)


# ----------------------------------------------------------------------------- 7: VeRA save_projection, d_initial


def _peft_vera_dir(tmp_path, gen, **kw):
    base = tiny_llama()
    with quiet():
        config = VeraConfig(r=4, target_modules=["q_proj", "v_proj"], projection_prng_key=7, **kw)
        pm = get_peft_model(copy.deepcopy(base), config)
    _randomize(pm, gen)
    with quiet():
        pm.save_pretrained(tmp_path / "peft")
    return base, pm.eval(), tmp_path / "peft"


def _edit_checkpoint(src, dst, config_changes, tensor_edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    state = tensor_edit(load_file(dst / "adapter_model.safetensors"))
    save_file(state, str(dst / "adapter_model.safetensors"))


def test_vera_load_follows_save_projection(tmp_path, gen):
    base, _, peft_dir = _peft_vera_dir(tmp_path, gen)
    ids = token_ids(gen)

    # save_projection=False with projections stored (and changed): PEFT warns and redraws them.
    def doubled(state):
        state["base_model.vera_A"] = 2 * state["base_model.vera_A"]
        return state

    _edit_checkpoint(peft_dir, tmp_path / "redraw", {"save_projection": False}, doubled)
    with pytest.warns(UserWarning, match="Specified to not load vera_A and vera_B"):
        reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "redraw").eval()
    with pytest.warns(UserWarning, match="Specified to not load vera_A and vera_B"):
        fused = load_peft_adapter(copy.deepcopy(base), tmp_path / "redraw")
    for name, layer in adapter_layers(fused):
        A, _ = layer.projection_slices()
        assert torch.equal(A, _tuner_layers(reference)[name].vera_A["default"][: layer.r, : layer.in_features])
    with torch.no_grad():
        assert rel_err(model_output(fused, ids), model_output(reference, ids)) < TOL

    # save_projection=True with no projections stored: PEFT refuses, and so does pefttriton.
    def dropped(state):
        return {k: v for k, v in state.items() if k not in ("base_model.vera_A", "base_model.vera_B")}

    _edit_checkpoint(peft_dir, tmp_path / "missing", {"save_projection": True}, dropped)
    with quiet(), pytest.raises(ValueError):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "missing")
    with pytest.raises(ValueError, match=r"save_projection=True but the adapter holds no base_model\.vera_A"):
        load_peft_adapter(copy.deepcopy(base), tmp_path / "missing")


def test_vera_d_initial_both_ways(tmp_path, gen):
    base, pm, peft_dir = _peft_vera_dir(tmp_path, gen, d_initial=0.25)
    with quiet():
        loaded = load_peft_adapter(copy.deepcopy(base), peft_dir)
    assert {layer.d_initial for _, layer in adapter_layers(loaded)} == {0.25}
    converted = from_peft_model(copy.deepcopy(pm))
    assert {layer.d_initial for _, layer in adapter_layers(converted)} == {0.25}

    # out: the layers' d_initial, and PEFT reads it back
    ours = inject(copy.deepcopy(base), FusedVeRAConfig(r=4, target_modules=["q_proj", "v_proj"], d_initial=0.3))
    save_peft_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["d_initial"] == 0.3
    with quiet():
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert reloaded.peft_config["default"].d_initial == 0.3
    adapter_layers(ours)[0][1].d_initial = 0.5
    with pytest.raises(ValueError, match=r"one d_initial; the model's VeRA layers have \[0.3, 0.5\]"):
        save_peft_adapter(ours, tmp_path / "mixed")
