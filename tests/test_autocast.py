"""``torch.autocast`` behaves like ``F.linear`` for every fused op, eager and compiled, both backends.

Under ``torch.autocast("cpu", torch.bfloat16)`` (what the HF Trainer does with ``bf16=True``) an
injected Llama or GPT-2 once raised "weight must have dtype torch.bfloat16", a fused LoRA backward
raised a dtype mismatch, and eager torch, eager Triton and compiled disagreed on the output dtype.
The contract: the op computes in the autocast dtype (``x``, ``weight``, ``bias``, ``A``, ``B`` cast
to it, float64 left alone), accumulates in float32, and returns the autocast dtype in every mode.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, model_output, rel_err, tiny_gpt2, tiny_llama, token_ids
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import pefttriton
from pefttriton import LoRAConfig, VeRAConfig, inject, lorma_pi_linear, lowrank_linear
from pefttriton.ops.naive import lorma_pi_linear_reference, lowrank_linear_reference

BF16 = torch.bfloat16
TOL = 3e-2  # bf16 inputs: relative error against float64 math on the same bf16-rounded numbers

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _inputs(gen, N=7, n=10, m=9, r=3):
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return [rnd(N, n), rnd(m, n) / n**0.5, rnd(m), rnd(r, n) / n**0.5, rnd(m, r), rnd(r), rnd(m)]


def _bf16_reference(args, scale):
    """float64 math on the numbers autocast would see: matrices rounded to bf16, vectors fp32."""
    x, w, bias, A, B, d, b = args
    rounded = [t.to(BF16).double() for t in (x, w, bias, A, B)]
    return lowrank_linear_reference(*rounded, d.double(), b.double(), scale=scale)


def test_op_output_dtype_and_values(backend, gen):
    args = _inputs(gen)
    with torch.autocast(DEVICE.type, BF16):
        y = lowrank_linear(*args, scale=0.5)
    assert y.dtype == BF16
    assert rel_err(y, _bf16_reference(args, 0.5)) < TOL


def test_op_backward_inside_autocast(backend, gen):
    """Backward run inside the autocast block: fp32 accumulators stay fp32, grads keep input dtypes."""
    args = [t.requires_grad_(True) for t in _inputs(gen)]
    with torch.autocast(DEVICE.type, BF16):
        y = lowrank_linear(*args, scale=0.5)
        y.float().sum().backward()
    ref = [t.detach().to(BF16).double().requires_grad_(True) for t in args[:5]]
    ref += [t.detach().double().requires_grad_(True) for t in args[5:]]
    lowrank_linear_reference(*ref, scale=0.5).sum().backward()
    for t, t_ref in zip(args, ref):
        assert t.grad.dtype == torch.float32
        assert rel_err(t.grad, t_ref.grad) < TOL


def test_op_leaves_float64_alone(backend, gen):
    args = [t.double() for t in _inputs(gen)]
    with torch.autocast(DEVICE.type, BF16):
        y = lowrank_linear(*args, scale=0.5)
    assert y.dtype == torch.float64
    assert rel_err(y, lowrank_linear_reference(*args, scale=0.5)) < 1e-12


def test_lorma_pi_under_autocast(backend, gen):
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x, w, bias, A, B = rnd(6, 10), rnd(9, 10) / 10**0.5, rnd(9), rnd(3, 9) / 3, rnd(9, 3)
    with torch.autocast(DEVICE.type, BF16):
        y = lorma_pi_linear(x, w, bias, A, B, scale=0.5)
    assert y.dtype == BF16
    ref = lorma_pi_linear_reference(*[t.to(BF16).double() for t in (x, w, bias)], A.double(), B.double(), scale=0.5)
    assert rel_err(y, ref) < TOL


def test_compiled_agrees_with_eager(backend, gen):
    """One output dtype (and the same numbers) in eager and under torch.compile (aot_eager)."""
    args = _inputs(gen)

    def f(*a):
        return lowrank_linear(*a, scale=0.5)

    compiled = torch.compile(f, fullgraph=True, backend=aot_autograd(fw_compiler=lambda gm, _: gm.forward))
    with torch.autocast(DEVICE.type, BF16):
        eager, comp = f(*args), compiled(*args)
    assert eager.dtype == comp.dtype == BF16
    assert torch.equal(eager, comp)
    assert compiled(*args).dtype == torch.float32  # autocast off again: recompiled, fp32


# -------------------------------------------------------------------------------- modules and models


@pytest.mark.parametrize("kind", ["vera", "lora", "deep_lora", "lorma_plus", "lorma_pi"])
def test_modules_train_under_autocast(backend, gen, kind):
    """fp32 layer, bf16 input from an earlier autocast op: forward, backward (inside the block)."""
    base = nn.Linear(10, 9)
    layer = {
        "vera": lambda: pefttriton.FusedVeRALinear(base, 4),
        "lora": lambda: pefttriton.FusedLoRALinear(base, 4),
        "deep_lora": lambda: pefttriton.FusedDeepLoRALinear(base, 4),
        "lorma_plus": lambda: pefttriton.FusedLoRMALinear(base, 4, variant="plus"),
        "lorma_pi": lambda: pefttriton.FusedLoRMALinear(base, 4, variant="pi"),
    }[kind]()
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    x = torch.randn(5, 10, generator=gen)
    with torch.autocast(DEVICE.type, BF16):
        y = layer(F.linear(x, torch.eye(10)))  # a bf16 activation, as between autocast layers
        assert y.dtype == BF16
        y.float().square().sum().backward()
    expect = layer(x.to(BF16).float()).detach()  # fp32 layer on the same bf16-rounded input
    assert rel_err(y, expect) < TOL
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("config", [VeRAConfig(r=4, target_modules=["q_proj", "v_proj", "c_attn", "c_fc"]),
                                    LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "c_attn", "c_fc"])],
                         ids=["vera", "lora"])
def test_injected_models_under_autocast(backend, gen, family, config):
    base = tiny_llama() if family == "llama" else tiny_gpt2()
    config = copy.deepcopy(config)
    config.target_modules = [t for t in config.target_modules if any(n.endswith(t) for n, _ in base.named_modules())]
    model = inject(copy.deepcopy(base), config)
    ids = token_ids(gen)
    with torch.autocast(DEVICE.type, BF16):
        logits = model_output(model, ids)
        loss = logits.float().logsumexp(-1).mean()
        loss.backward()
    with torch.autocast(DEVICE.type, BF16):
        plain = model_output(base, ids)  # adapters start at the base model: same logits up to rounding
    assert logits.dtype == plain.dtype
    assert rel_err(logits, plain) < 5e-2
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_hf_trainer_bf16_on_cpu(tmp_path, gen):
    """The HF Trainer with bf16=True (autocast on the CPU) trains an injected tiny Llama."""
    from transformers import Trainer, TrainingArguments

    model = inject(tiny_llama(), LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = [{"input_ids": ids, "labels": ids} for ids in token_ids(gen, batch=8, length=9)]
    args = TrainingArguments(
        output_dir=str(tmp_path), bf16=True, use_cpu=DEVICE.type == "cpu", per_device_train_batch_size=4, max_steps=3,
        learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    seen = []
    layer = pefttriton.integration.injection.adapter_layers(model)[0][1]
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    result = trainer.train()
    assert seen and set(seen) == {BF16}, seen  # the Trainer really ran the layers under autocast
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "no adapter parameter was updated"
