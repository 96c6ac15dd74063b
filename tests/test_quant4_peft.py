"""QLoRA parity: pefttriton's 4-bit engine on PEFT's own layers over bitsandbytes 4-bit bases, on the CPU.

``pefttriton.integration.quantized.engine_call_4bit`` computes a PEFT layer's output from its tensors
(what ``accelerate`` will call for these layers); it is compared with PEFT's forward and backward of
the same layer: ``peft.tuners.lora.bnb.Linear4bit`` (LoRA) and ``peft.tuners.vera.layer.Linear`` on a
``bitsandbytes.nn.Linear4bit`` (VeRA), for NF4 and FP4, double quantization on and off, blocksize
64 and 128, compute dtype float32 (1e-5) and bfloat16 (its rounding); then a tiny Llama QLoRA
training step (``prepare_model_for_kbit_training`` + ``get_peft_model``) against PEFT's.
"""


import pytest
import torch
from helpers import VOCAB, rel_err

import pefttriton
from pefttriton.integration import quantized

# bitsandbytes quantizes these layers on the CPU (its CPU kernels are what the tests compare with)
pytestmark = pytest.mark.cpu_only

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def linear4bit(gen, in_features, out_features, quant_type, nested, blocksize, compute_dtype, bias=True,
               quant_storage=torch.uint8):
    """A bitsandbytes Linear4bit quantized on the CPU from a random weight."""
    base = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                             compress_statistics=nested, quant_type=quant_type, quant_storage=quant_storage)
    with torch.no_grad():
        base.weight.data.copy_(torch.randn(out_features, in_features, generator=gen) / in_features**0.5)
        if bias:
            base.bias.copy_(torch.randn(out_features, generator=gen))
    base.weight.blocksize = blocksize
    return base.to("cpu")  # bitsandbytes quantizes on the first move to a device


def lora_layer(gen, base, r=4, alpha=8):
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit

    layer = Linear4bit(base, "default", config=LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0), r=r, lora_alpha=alpha)
    # float32 adapters on any compute dtype, as get_peft_model leaves them (autocast_adapter_dtype)
    layer.lora_A.float()
    layer.lora_B.float()
    with torch.no_grad():
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return layer.train()


def compare(peft_fn, ours_fn, inputs, tol, gen):
    """Output and gradients of ``inputs`` from PEFT's forward and from the engine."""
    y_peft = peft_fn()
    grad_out = torch.randn(y_peft.shape, generator=gen).to(y_peft.dtype)
    g_peft = torch.autograd.grad(y_peft, inputs, grad_out)
    y = ours_fn()
    assert not isinstance(y, str), y
    assert y.dtype == y_peft.dtype and y.shape == y_peft.shape
    g = torch.autograd.grad(y, inputs, grad_out)
    errs = [rel_err(y, y_peft)] + [rel_err(a, b) for a, b in zip(g, g_peft)]
    assert max(errs) < tol, errs
    return errs


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_lora_4bit_layer_matches_peft(gen, quant_type, nested, blocksize, compute_dtype):
    """x float32 (what prepare_model_for_kbit_training leaves), adapters float32, the base GEMM in
    the compute dtype; output and the gradients of x, lora_A, lora_B."""
    base = linear4bit(gen, 128, 48, quant_type, nested, blocksize, compute_dtype)
    layer = lora_layer(gen, base)
    assert quantized.base_reason_4bit(base) is None
    x = torch.randn(2, 5, 128, generator=gen).requires_grad_()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    compare(lambda: layer(x), lambda: quantized.engine_call_4bit(base, x, A, B, scale=layer.scaling["default"]),
            [x, A, B], TOL[compute_dtype], gen)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_4bit_layer_triton_matches_peft(gen, compute_dtype):
    """The same through the 4-bit Triton kernels (interpreter); bf16 weights stored as bfloat16
    (quant_storage, as FSDP-QLoRA sets it) and x in bf16."""
    storage = torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.uint8
    base = linear4bit(gen, 128, 48, "nf4", True, 64, compute_dtype, quant_storage=storage)
    layer = lora_layer(gen, base)
    x = torch.randn(2, 5, 128, generator=gen).to(compute_dtype).requires_grad_()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with pefttriton.use_backend("triton"):
        compare(lambda: layer(x), lambda: quantized.engine_call_4bit(base, x, A, B, scale=layer.scaling["default"]),
                [x, A, B], TOL[compute_dtype], gen)
        assert pefttriton.last_path() == "fused"


def test_parity_check_can_fail(gen):
    """The comparison sees a code book swapped under the same codes (NF4 read as FP4), and a scale
    off by 1%."""
    base = linear4bit(gen, 128, 48, "nf4", True, 64, torch.float32)
    layer = lora_layer(gen, base)
    x = torch.randn(2, 5, 128, generator=gen).requires_grad_()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = layer.scaling["default"]
    with pytest.raises(AssertionError):
        compare(lambda: layer(x), lambda: quantized.engine_call_4bit(base, x, A, B, scale=scale * 1.01),
                [x, A, B], TOL[torch.float32], gen)
    fp4 = linear4bit(torch.Generator().manual_seed(7), 128, 48, "fp4", True, 64, torch.float32)
    nf4 = lora_layer(gen, linear4bit(torch.Generator().manual_seed(7), 128, 48, "nf4", True, 64, torch.float32))
    nf4_A, nf4_B = nf4.lora_A["default"].weight, nf4.lora_B["default"].weight
    with pytest.raises(AssertionError):  # the same weight quantized as FP4 instead of NF4
        compare(lambda: nf4(x), lambda: quantized.engine_call_4bit(fp4, x, nf4_A, nf4_B, scale=scale),
                [x, nf4_A, nf4_B], TOL[torch.float32], gen)


def test_reasons(gen):
    base = linear4bit(gen, 64, 32, "nf4", True, 64, torch.float32)
    assert quantized.is_4bit_base(base) and quantized.base_reason_4bit(base) is None
    assert quantized.base_reason_4bit(torch.nn.Linear(4, 4)) == quantized.NOT_4BIT
    assert quantized.base_reason_4bit(bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)) == quantized.INT8
    fresh = bnb.nn.Linear4bit(64, 32)  # never moved to a device: not quantized yet
    assert quantized.base_reason_4bit(fresh) == quantized.NOT_QUANTIZED
    wrong = linear4bit(gen, 64, 32, "nf4", False, 64, torch.float32)
    wrong.weight.quant_state.absmax = wrong.weight.quant_state.absmax[:-1]
    assert quantized.base_reason_4bit(wrong) == quantized.LAYOUT
    x = torch.randn(3, 64, generator=gen)
    assert quantized.engine_call_4bit(base, x.long(), torch.zeros(2, 64), torch.zeros(32, 2)) == quantized.X_TYPE
    # bitsandbytes repacks a 4-bit weight for its CPU kernel at a no-grad eval call (AVX512-BF16 CPUs)
    base.eval()
    with torch.no_grad():
        base(x)
    if getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        assert quantized.base_reason_4bit(base) == quantized.CPU_PACKED


def test_compute_dtype_follows_bitsandbytes(gen):
    """Unset, the first call fixes it to x's dtype (float32 / bfloat16), as Linear4bit.forward does."""
    base = linear4bit(gen, 64, 32, "nf4", False, 64, None)
    assert quantized.compute_dtype(base, torch.zeros(1, 64, dtype=torch.bfloat16)) == torch.bfloat16
    assert base.compute_dtype == torch.bfloat16 and base.compute_type_is_set
    assert quantized.compute_dtype(base, torch.zeros(1, 64)) == torch.bfloat16  # fixed now
    with torch.autocast("cpu", dtype=torch.float16):
        assert quantized.compute_dtype(base, torch.zeros(1, 64)) == torch.float16


# ----------------------------------------------------------------------------- models


def tiny_llama_4bit(tmp_path, quant_type="nf4", nested=True, compute_dtype=torch.float32):
    """A 2-layer Llama loaded 4-bit by transformers (``BitsAndBytesConfig``) on the CPU. Even widths:
    bitsandbytes' CPU kernels take odd ones through a torch.compile'd fallback (seconds per shape)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=nested, bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")


def test_vera_on_4bit_base_matches_peft(tmp_path, gen):
    """PEFT's VeRA layers on the 4-bit Llama: output and the gradients of x, lambda_d, lambda_b."""
    from peft import VeraConfig, get_peft_model
    from peft.tuners.vera.layer import Linear as VeraLinear

    model = get_peft_model(tiny_llama_4bit(tmp_path), VeraConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    layers = [m for m in model.modules() if type(m) is VeraLinear]
    assert layers and all(quantized.is_4bit_base(m.base_layer) for m in layers)
    for layer in layers[:3]:
        a = layer.active_adapters[0]
        d, b = layer.vera_lambda_d[a], layer.vera_lambda_b[a]
        with torch.no_grad():
            b.copy_(torch.randn(b.shape, generator=gen))
            d.copy_(torch.randn(d.shape, generator=gen))
        A = layer.vera_A[a][:, : layer.in_features]
        B = layer.vera_B[a][: layer.out_features, :]
        x = torch.randn(2, 3, layer.in_features, generator=gen).requires_grad_()
        compare(lambda: layer(x), lambda: quantized.engine_call_4bit(layer.base_layer, x, A, B, d, b),
                [x, d, b], TOL[torch.float32], gen)


def _train_step(model, ids, lr=0.5):
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.clone() for p in params]
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
    return loss.detach(), grads, [p.detach().clone() for p in params]


def test_tiny_llama_qlora_train_step_matches_peft(tmp_path, gen):
    """prepare_model_for_kbit_training (gradient checkpointing on) + LoRA on every linear layer; one
    SGD step through PEFT's forward and one through pefttriton.accelerate (every layer fused on its
    4-bit base), from the same state: the losses, every adapter gradient and the updated adapters
    agree to 1e-5 (compute dtype float32)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from peft.tuners.lora.bnb import Linear4bit

    model = prepare_model_for_kbit_training(tiny_llama_4bit(tmp_path, "nf4", True, torch.float32))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    layers = [m for m in model.modules() if type(m) is Linear4bit]
    assert len(layers) == 14
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    start = [p.detach().clone() for p in params]
    ids = torch.randint(3, VOCAB, (2, 9), generator=gen)

    loss_peft, grads_peft, after_peft = _train_step(model, ids)
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    import pefttriton

    calls = []
    engine = quantized.lowrank_linear_4bit
    quantized.lowrank_linear_4bit = lambda *a, **k: calls.append(1) or engine(*a, **k)
    try:
        report = pefttriton.accelerate(model)
        assert len(report.fused) == len(layers) and not report.fallback, str(report)
        loss, grads, after = _train_step(model, ids)
    finally:
        quantized.lowrank_linear_4bit = engine
    assert len(calls) >= 2 * len(layers)  # every layer, forward and the checkpoint's recompute
    assert set(pefttriton.acceleration_report(model).last.values()) == {"fused (lean)"}
    assert rel_err(loss, loss_peft) < 1e-5
    for name, g, g_peft in zip([n for n, p in model.named_parameters() if p.requires_grad], grads, grads_peft):
        assert rel_err(g, g_peft) < 1e-5, name
    for p, p_peft in zip(after, after_peft):
        assert rel_err(p, p_peft) < 1e-5


def test_accelerate_reports_what_the_4bit_engine_does_not_take(tmp_path, gen):
    """QLoRA with dropout while training: PEFT's forward runs (the 4-bit engine takes one plain
    adapter), with the reason; in eval mode the same layers run fused."""
    import pefttriton
    from peft import LoraConfig, get_peft_model
    from pefttriton.integration import acceleration

    model = get_peft_model(tiny_llama_4bit(tmp_path), LoraConfig(r=4, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    model.train()
    report = pefttriton.accelerate(model)
    assert set(report.fallback.values()) == {acceleration.QUANTIZED_FEATURE} and not report.fused
    model.eval()
    assert len(pefttriton.acceleration_report(model).fused) == 4
