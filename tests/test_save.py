"""pefttriton's own adapter files: only trainable tensors (+ the VeRA seed), bit-exact round trip."""

import copy

import pytest
import torch
from safetensors import safe_open
from test_inject import model_output, tiny_gpt2, tiny_llama, token_ids

from pefttriton.config import DeepLoRAConfig, LoRAConfig, LoRMAConfig, VeRAConfig
from pefttriton.injection import fused_layers, inject
from pefttriton.save import load_adapter, read_adapter, save_adapter
from pefttriton.vera import VeRAProjections


def _randomize(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def _file_keys(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _assert_bit_identical(loaded, original, ids):
    params, loaded_params = dict(original.named_parameters()), dict(loaded.named_parameters())
    assert sorted(params) == sorted(loaded_params)
    for name, p in params.items():
        q = loaded_params[name]
        assert q.dtype == p.dtype and torch.equal(q, p), name
        assert q.requires_grad == p.requires_grad, name
    for (name, layer), (name2, layer2) in zip(fused_layers(original), fused_layers(loaded)):
        assert name == name2 and type(layer) is type(layer2) and layer.merged == layer2.merged
        assert getattr(layer, "fan_in_fan_out", False) == getattr(layer2, "fan_in_fan_out", False)
        if hasattr(layer, "projections"):
            assert torch.equal(layer.projections.vera_A, layer2.projections.vera_A)
            assert torch.equal(layer.projections.vera_B, layer2.projections.vera_B)
    with torch.no_grad():
        assert torch.equal(model_output(loaded, ids), model_output(original, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vera_round_trip_only_vectors_and_seed(tmp_path, backend, gen, dtype):
    base = tiny_llama().to(dtype)
    model = inject(copy.deepcopy(base), VeRAConfig(r=5, target_modules=["q_proj", "v_proj", "down_proj"], projection_seed=9))
    _randomize(model, gen)
    stats = save_adapter(model, tmp_path / "a.safetensors")
    names = [name for name, _ in fused_layers(model)]
    # only lambda_d (5,) and lambda_b (out,), fp32: no projections, no frozen weights
    assert _file_keys(tmp_path / "a.safetensors") == {f"{n}.{v}" for n in names for v in ("lambda_d", "lambda_b")}
    assert stats["tensors"] == 12 and stats["bytes"] == 4 * 2 * ((5 + 30) + (5 + 10) + (5 + 30))
    _, meta = read_adapter(tmp_path / "a.safetensors")
    assert meta["projections"] == [{"r": 5, "max_in": 45, "max_out": 30, "seed": 9, "stored": False}]
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors")
    # one shared pair again, redrawn from the seed
    assert len({id(layer.projections) for _, layer in fused_layers(loaded)}) == 1
    _assert_bit_identical(loaded, model, token_ids(gen))


def test_vera_projections_stored_when_not_redrawable(tmp_path, gen):
    base = tiny_llama()
    model = inject(copy.deepcopy(base), VeRAConfig(r=3, target_modules=["q_proj"]))
    _randomize(model, gen)
    with torch.no_grad():  # e.g. projections loaded from a PEFT checkpoint drawn elsewhere
        fused_layers(model)[0][1].projections.vera_A.mul_(1.5)
    save_adapter(model, tmp_path / "a.safetensors")
    keys = _file_keys(tmp_path / "a.safetensors")
    assert {"__projections__.0.vera_A", "__projections__.0.vera_B"} <= keys
    _assert_bit_identical(load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors"), model, token_ids(gen))


def _lorma_available() -> bool:
    try:
        import pefttriton.lorma  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("adapter", ["lora", "deep_lora"] + (["lorma"] if _lorma_available() else []))
def test_round_trip_lora_family_gpt2(tmp_path, gen, adapter):
    base = tiny_gpt2()
    cfg = {
        "lora": LoRAConfig(r=3, lora_alpha=5.0, lora_dropout=0.1, target_modules=["c_attn", "c_fc"]),
        "deep_lora": DeepLoRAConfig(r=2, eps=0.25, target_modules=["c_attn", "c_fc"]),
        "lorma": LoRMAConfig(r=3, alpha=2.0, variant="pi", target_modules=["c_attn", "c_fc"]),
    }[adapter]
    model = inject(copy.deepcopy(base), cfg).eval()
    _randomize(model, gen)
    save_adapter(model, tmp_path / "a.safetensors")
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert _file_keys(tmp_path / "a.safetensors") == expected
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors").eval()
    for _, layer in fused_layers(loaded):
        assert layer.fan_in_fan_out
        if adapter == "lora":
            assert layer.alpha == 5.0 and layer.dropout_p == 0.1
        elif adapter == "deep_lora":
            assert layer.eps == 0.25
        else:
            assert layer.alpha == 2.0 and layer.variant == "pi"
    _assert_bit_identical(loaded, model, token_ids(gen))


def test_head_merged_layer_and_existing_fused_layers(tmp_path, gen):
    base = tiny_llama()
    model = inject(copy.deepcopy(base), VeRAConfig(r=4, target_modules=["q_proj"]))
    inject(model, LoRAConfig(r=2, target_modules=["up_proj"]))
    model.lm_head.weight.requires_grad_(True)  # a head trained along
    _randomize(model, gen)
    fused_layers(model)[0][1].merge()
    save_adapter(model, tmp_path / "a.safetensors")
    assert "lm_head.weight" in _file_keys(tmp_path / "a.safetensors")
    assert "model.embed_tokens.weight" not in _file_keys(tmp_path / "a.safetensors")
    # into a plain model
    _assert_bit_identical(load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors"), model, token_ids(gen))
    # into a model that already holds fused layers of the same kinds (fresh values)
    target = inject(copy.deepcopy(base), VeRAConfig(r=4, target_modules=["q_proj"]))
    inject(target, LoRAConfig(r=2, target_modules=["up_proj"]))
    _assert_bit_identical(load_adapter(target, tmp_path / "a.safetensors"), model, token_ids(gen))


def test_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="no fused adapter"):
        save_adapter(tiny_llama(), tmp_path / "a.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a pefttriton adapter"):
        load_adapter(tiny_llama(), tmp_path / "plain.safetensors")
    model = inject(tiny_llama(), VeRAConfig(r=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="does not have"):
        load_adapter(tiny_gpt2(), tmp_path / "a.safetensors")
    other = inject(tiny_llama(), VeRAConfig(r=3, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="rank 3"):
        load_adapter(other, tmp_path / "a.safetensors")
    assert isinstance(fused_layers(model)[0][1].projections, VeRAProjections)
