"""PEFT VeRA / LoRA adapters into fused layers and back, against PEFT's own layers.

"Identical" is checked at two levels: every adapter tensor crosses over bit for bit
(``torch.equal``), and the model outputs agree to fp32 rounding (the fused engine adds the
low-rank path inside one GEMM, PEFT adds it after the base GEMM: a different summation order,
so relative differences of order 1e-7 remain; the bound is 1e-5). A PEFT model loaded back from
what pefttriton saved is compared with the original PEFT model: there the outputs are bitwise
equal, since both sides run PEFT's code on the same tensors.

Which layers and modules PEFT ends up with (exact target names, one adapter of several,
modules_to_save, VeRA's save_projection and d_initial): ``test_peft_interop_roundtrip.py``.
"""

import copy
import json
import warnings

import peft
import pytest
import torch
from helpers import model_output, rel_err, tiny_encoder, tiny_gpt2, tiny_llama, token_ids
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file

from pefttriton.adapters.config import DeepLoRAConfig, LoRAConfig as FusedLoRAConfig, VeRAConfig as FusedVeRAConfig
from pefttriton.integration.injection import inject
from pefttriton.integration.surgery import adapter_layers
from pefttriton.adapters.lora import FusedLoRALinear
from pefttriton.integration.peft_interop import from_peft_model, load_peft_adapter, save_peft_adapter
from pefttriton.adapters.vera import FusedVeRALinear

TOL = 1e-5


def _randomize_peft(peft_model, gen, scale=0.5):
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def _peft_layers(peft_model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, BaseTunerLayer)}


def _assert_same_tensors(fused_model, peft_model, adapter="default"):
    """Every adapter tensor of the PEFT layers equals the fused layer's, bit for bit."""
    peft_layers = _peft_layers(peft_model)
    fused = dict(adapter_layers(fused_model))
    assert sorted(fused) == sorted(peft_layers)
    for name, layer in fused.items():
        pl = peft_layers[name]
        if isinstance(layer, FusedVeRALinear):
            assert torch.equal(layer.lambda_d, pl.vera_lambda_d[adapter])
            assert torch.equal(layer.lambda_b, pl.vera_lambda_b[adapter])
            A, B = layer.projection_slices()
            assert torch.equal(A, pl.vera_A[adapter][: layer.r, : layer.in_features])
            assert torch.equal(B, pl.vera_B[adapter][: layer.out_features, : layer.r])
        else:
            assert torch.equal(layer.lora_A, pl.lora_A[adapter].weight)
            assert torch.equal(layer.lora_B, pl.lora_B[adapter].weight)
            assert layer.scale == pl.scaling[adapter]


def _compare_with_grads(fused_model, peft_model, ids, gen):
    """Outputs and the gradients of every adapter tensor agree (fused vs PEFT)."""
    y = model_output(fused_model, ids)
    y_peft = model_output(peft_model, ids)
    assert rel_err(y, y_peft) < TOL
    w = torch.randn(y.shape, generator=gen)
    (y * w).sum().backward()
    (y_peft * w).sum().backward()
    peft_layers = _peft_layers(peft_model)
    for name, layer in adapter_layers(fused_model):
        pl = peft_layers[name]
        if isinstance(layer, FusedVeRALinear):
            pairs = [(layer.lambda_d, pl.vera_lambda_d["default"]), (layer.lambda_b, pl.vera_lambda_b["default"])]
        else:
            pairs = [(layer.lora_A, pl.lora_A["default"].weight), (layer.lora_B, pl.lora_B["default"].weight)]
        for ours, theirs in pairs:
            assert rel_err(ours.grad, theirs.grad) < 1e-4, name


# ----------------------------------------------------------------------------- VeRA


def _peft_vera_llama(gen, r=5, save_projection=True):
    base = tiny_llama()
    cfg = VeraConfig(r=r, target_modules=["q_proj", "v_proj", "down_proj"], projection_prng_key=7, save_projection=save_projection)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about save_projection=False
        peft_model = get_peft_model(copy.deepcopy(base), cfg).eval()
    _randomize_peft(peft_model, gen)
    return base, peft_model


@pytest.mark.parametrize("r", [1, 5])
def test_vera_from_peft_model(backend, gen, r):
    base, peft_model = _peft_vera_llama(gen, r)
    reference = copy.deepcopy(peft_model)
    fused = from_peft_model(peft_model)
    assert type(fused) is type(base)
    assert all(isinstance(layer, FusedVeRALinear) for _, layer in adapter_layers(fused))
    _assert_same_tensors(fused, reference)
    trainable = {n.rsplit(".", 1)[-1] for n, p in fused.named_parameters() if p.requires_grad}
    assert trainable == {"lambda_d", "lambda_b"}
    _compare_with_grads(fused, reference, token_ids(gen), gen)


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_checkpoint_both_ways(tmp_path, gen, save_projection):
    base, peft_model = _peft_vera_llama(gen, save_projection=save_projection)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about save_projection=False
        peft_model.save_pretrained(tmp_path / "peft")
    keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert ("base_model.vera_A" in keys) == save_projection
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")
    _assert_same_tensors(fused, peft_model)
    ids = token_ids(gen)
    with torch.no_grad():
        y_peft = model_output(peft_model, ids)
        assert rel_err(model_output(fused, ids), y_peft) < TOL

    # Back: what pefttriton writes, PEFT loads, and its outputs are PEFT's original ones exactly.
    save_peft_adapter(fused, tmp_path / "ours", save_projection=save_projection)
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(ours) == keys
    for key, value in load_file(tmp_path / "peft" / "adapter_model.safetensors").items():
        assert torch.equal(ours[key], value), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    config = reloaded.peft_config["default"]
    assert config.peft_type == peft.PeftType.VERA and config.projection_prng_key == 7 and config.r == 5
    with torch.no_grad():
        assert torch.equal(model_output(reloaded, ids), y_peft)


def test_vera_fused_to_peft_gpt2(tmp_path, backend, gen):
    """Fused VeRA on GPT-2's Conv1D layers, saved for PEFT: PEFT's model computes what ours does."""
    base = tiny_gpt2()
    fused = inject(copy.deepcopy(base), FusedVeRAConfig(r=3, target_modules=["c_attn", "c_fc"], projection_seed=5))
    with torch.no_grad():
        for p in fused.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    save_peft_adapter(fused, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True).eval()
    _assert_same_tensors(fused, peft_model)
    _compare_with_grads(fused, peft_model, token_ids(gen), gen)
    # and PEFT's own GPT-2 checkpoint, projections redrawn from the seed, loads into fused layers
    peft_model.peft_config["default"].save_projection = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path / "peft")
        again = load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert "base_model.vera_A" not in load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert all(layer.fan_in_fan_out for _, layer in adapter_layers(again))
    _assert_same_tensors(again, peft_model)


# ----------------------------------------------------------------------------- LoRA


def _peft_lora(base, gen, **kw):
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**kw)).eval()
    _randomize_peft(peft_model, gen)
    return peft_model


@pytest.mark.parametrize(
    "family, kw",
    [
        ("llama", dict(r=3, lora_alpha=5, target_modules=["q_proj", "o_proj", "gate_proj"],
                       rank_pattern={"o_proj": 1}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 7})),
        ("gpt2", dict(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
        ("roberta", dict(r=5, lora_alpha=4, target_modules=["query", "value"], use_rslora=True)),
    ],
)
def test_lora_both_ways(tmp_path, backend, gen, family, kw):
    base = {"llama": tiny_llama, "gpt2": tiny_gpt2, "roberta": lambda: tiny_encoder("roberta")}[family]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = _peft_lora(base, gen, **kw)
    ids = token_ids(gen)

    # In, from the in-memory PEFT model.
    fused = from_peft_model(copy.deepcopy(peft_model))
    assert all(isinstance(layer, FusedLoRALinear) for _, layer in adapter_layers(fused))
    _assert_same_tensors(fused, peft_model)
    _compare_with_grads(fused, copy.deepcopy(peft_model), ids, gen)

    # In, from PEFT's checkpoint.
    peft_model.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")
    _assert_same_tensors(loaded, peft_model)

    # Out, and PEFT loads it back: same tensors, same scaling, same outputs.
    save_peft_adapter(loaded, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    _assert_same_tensors(loaded, reloaded)
    with torch.no_grad():
        y_peft = model_output(peft_model, ids)
        assert torch.equal(model_output(reloaded, ids), y_peft)
        assert rel_err(model_output(loaded, ids), y_peft) < TOL


def test_deep_lora_exported_as_peft_lora(tmp_path, backend, gen):
    base = tiny_llama()
    fused = inject(copy.deepcopy(base), DeepLoRAConfig(r=3, eps=0.5, target_modules=["v_proj", "up_proj"]))
    save_peft_adapter(fused, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    layers = _peft_layers(peft_model)
    for name, layer in adapter_layers(fused):
        delta = (layer.W3 @ layer.W2 @ layer.W1).double()  # the update, written plainly
        peft_delta = layers[name].get_delta_weight("default").double()
        assert rel_err(peft_delta, delta) < 1e-6
    ids = token_ids(gen)
    with torch.no_grad():
        assert rel_err(model_output(fused, ids), model_output(peft_model, ids)) < TOL


# ----------------------------------------------------------------------------- errors


def test_errors(tmp_path, gen):
    base = tiny_llama()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_peft_adapter(copy.deepcopy(base), tmp_path / "missing")
    with pytest.raises(ValueError, match="needs its PEFT config"):
        load_peft_adapter(copy.deepcopy(base), {})
    with pytest.raises(TypeError, match="adapter must be"):
        load_peft_adapter(copy.deepcopy(base), 3)
    dora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        from_peft_model(dora)
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(copy.deepcopy(base), tmp_path / "dora")
    # a key that is not a LoRA tensor of a Linear layer
    state = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 30),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(30, 2),
             "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 37)}
    with pytest.raises(ValueError, match="unsupported keys"):
        load_peft_adapter(copy.deepcopy(base), state, {"peft_type": "LORA", "r": 2})
    with pytest.raises(ValueError, match="only PEFT VERA and LORA"):
        load_peft_adapter(copy.deepcopy(base), state, {"peft_type": "IA3"})
    bad_shape = {k: v for k, v in state.items() if "embed" not in k}
    bad_shape["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(29, 2)
    with pytest.raises(ValueError, match="expected shape"):
        load_peft_adapter(copy.deepcopy(base), bad_shape, {"peft_type": "LORA", "r": 2})
    # mixing adapters, or VeRA layers whose projections PEFT could not redraw from the seed
    mixed = inject(copy.deepcopy(base), FusedVeRAConfig(r=2, target_modules=["q_proj"]))
    inject(mixed, FusedLoRAConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="mixes"):
        save_peft_adapter(mixed, tmp_path / "mixed")
    vera = inject(copy.deepcopy(base), FusedVeRAConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        adapter_layers(vera)[0][1].projections.vera_A.mul_(2)
    with pytest.raises(ValueError, match="save_projection=True"):
        save_peft_adapter(vera, tmp_path / "vera", save_projection=False)


def _model_state(model):
    return {
        "modules": {name: type(m) for name, m in model.named_modules()},
        "params": {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()},
    }


def _assert_model_unchanged(model, before):
    after = _model_state(model)
    assert after["modules"] == before["modules"]
    assert after["params"].keys() == before["params"].keys()
    for name, (value, requires_grad) in before["params"].items():
        assert torch.equal(after["params"][name][0], value) and after["params"][name][1] == requires_grad, name


@pytest.mark.parametrize("broken", ["last_layer_shape", "last_layer_in_features", "last_saved_module"])
def test_failed_load_changes_nothing(gen, broken):
    """A PEFT adapter that does not fit at its last layer or its last module to save: the error
    comes before the first layer is replaced or the first module overwritten ("norm" also names
    every decoder layer's norms, by PEFT's suffix rule, so model.norm comes last)."""
    base = tiny_llama()
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "norm"],
                        init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    _randomize_peft(peft_model, gen)
    state = peft.get_peft_model_state_dict(peft_model)
    last = "base_model.model.model.layers.1.self_attn.v_proj"
    if broken == "last_layer_shape":
        state[f"{last}.lora_B.weight"] = torch.zeros(9, 2)
        pattern = r"layers\.1\.self_attn\.v_proj\.lora_B: expected shape \(10, 2\), got \(9, 2\)"
    elif broken == "last_layer_in_features":
        state[f"{last}.lora_A.weight"] = torch.zeros(2, 29)
        pattern = r"layers\.1\.self_attn\.v_proj\.lora_A: expected shape \(2, 30\), got \(2, 29\)"
    else:
        key = next(k for k in state if k.startswith("base_model.model.model.norm"))
        state[key] = torch.zeros(7)
        pattern = r"model\.norm.*expected shape \(30,\), got \(7,\)"
    target = copy.deepcopy(base)
    before = _model_state(target)
    with pytest.raises(ValueError, match=pattern):
        load_peft_adapter(target, state, config)
    _assert_model_unchanged(target, before)
