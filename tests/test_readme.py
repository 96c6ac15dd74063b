"""The README's usage example runs as written."""

import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    code = next(b for b in blocks if "FusedVeRALinear(base" in b)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    layer, base = namespace["layer"], namespace["base"]
    assert layer.merged and namespace["y"].shape == (4, 1024)
    # lambda_b starts at zero, so merging the fresh adapter leaves the weight's forward unchanged
    x = torch.randn(3, 1024)
    torch.testing.assert_close(layer(x), base(x))


def test_readme_use_in_models_example_runs(tmp_path, monkeypatch):
    """The "Use in models" block, on a tiny Llama built from a config (random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    code = next(b for b in blocks if "inject(model" in b)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 50, (2, 7))
    expected = model(ids).logits
    monkeypatch.chdir(tmp_path)
    namespace = {"model": model}
    exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "adapter.safetensors").exists() and (tmp_path / "peft_dir").is_dir()
    # lambda_b starts at zero: after merge_and_unload the model computes what it did before
    torch.testing.assert_close(namespace["model"](ids).logits, expected)


def test_readme_new_adapter_example_runs(tmp_path):
    """The "A new adapter" block registers an adapter that inject, save/load and merge then handle."""
    import pefttriton
    from pefttriton.adapters.registry import unregister_adapter

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    code = next(b for b in blocks if "register_adapter" in b)
    namespace: dict = {}
    try:
        exec(compile(code, str(README), "exec"), namespace)
        model = namespace["model"]
        layer = model[0]
        assert type(layer).__name__ == "ScaledLoRALinear" and layer.gain == 1.0
        with torch.no_grad():
            layer.B.normal_()
        x = torch.randn(3, 16)
        expected = layer.base_layer(x) + (x @ layer.A.T) @ layer.B.T
        torch.testing.assert_close(model(x), expected)
        pefttriton.save_adapter(model, tmp_path / "a.safetensors")
        fresh = torch.nn.Sequential(torch.nn.Linear(16, 16))
        fresh[0].load_state_dict(layer.base_layer.state_dict())
        torch.testing.assert_close(pefttriton.load_adapter(fresh, tmp_path / "a.safetensors")(x), expected)
        torch.testing.assert_close(pefttriton.merge_and_unload(model)(x), expected)
    finally:
        unregister_adapter("scaled_lora")


def test_readme_strategies_example_runs(capsys):
    """The "Backends and strategies" block: auto picks a path, a forced one runs, the measured
    autotune records its choice."""
    import pefttriton

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    code = next(b for b in blocks if "set_strategy_autotune(True)" in b)
    try:
        exec(compile(code, str(README), "exec"), {})
    finally:
        pefttriton.set_strategy_autotune(False)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] in ("lean", "weight")  # the PyTorch strategies on the CPU
    assert printed[1].startswith("{") and "factors" in printed[1]


def test_readme_qlora_example_runs(capsys):
    """The QLoRA block: all-MiniLM-L6-v2 loaded 4-bit by bitsandbytes on the CPU, PEFT LoRA on
    query / value, every LoRA layer fused on its 4-bit base; a forward through it runs the engine."""
    pytest.importorskip("bitsandbytes")
    import torch

    import pefttriton

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    code = next(b for b in blocks if "BitsAndBytesConfig(" in b)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    report = pefttriton.acceleration_report(namespace["model"])
    assert len(report.fused) == 12 and not report.fallback, str(report)
    assert "12 of 12 PEFT layers fused" in capsys.readouterr().out
    namespace["model"].eval()
    with torch.no_grad():
        namespace["model"](input_ids=torch.tensor([[101, 2204, 102]]))
    assert set(pefttriton.acceleration_report(namespace["model"]).last.values()) == {"fused (lean)"}
