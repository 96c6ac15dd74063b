"""Helpers shared by the test modules (fixtures stay in conftest.py).

Test modules import from here (``from helpers import rel_err``), never from each other or from
conftest. conftest.py imports this module before ``pytest_configure`` sets ``TRITON_INTERPRET``,
so nothing here may import pefttriton at module level; transformers is imported inside the
functions that build its models, so that loading conftest stays cheap.
"""

import os

import torch
from torch import nn

TEST_DEVICE = os.environ.get("PEFTTRITON_TEST_DEVICE", "") or "cpu"
"""``PEFTTRITON_TEST_DEVICE`` as given (conftest.py refuses anything but ``cpu`` and ``cuda``)."""

DEVICE = torch.device("cuda" if TEST_DEVICE == "cuda" else "cpu")
"""Where the suite runs: the CPU (kernels in the interpreter) or the GPU (compiled kernels)."""

BACKENDS = ("torch", "triton")
"""pefttriton's backends; the ``backend`` fixture of conftest.py runs a test once per entry."""

VOCAB = 37
"""Vocabulary size of the tiny transformers models."""


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected|, computed in float64."""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / max(scale, 1e-300)


# ----------------------------------------------------------------------------- tiny models


def tiny_llama(seed: int = 0) -> nn.Module:
    """Llama, 2 layers: q/o 30x30, k/v 10x30 (one kv head), gate/up 45x30, down 30x45; no bias."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=30, intermediate_size=45, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """GPT-2, 2 layers, width 28: c_attn 28->84, c_proj 28->28, c_fc 28->112, mlp c_proj 112->28 (Conv1D)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=28, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_encoder(family: str, seed: int = 0) -> nn.Module:
    """BERT or RoBERTa, 2 layers, width 28, intermediate 45."""
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=28, num_hidden_layers=2, num_attention_heads=4, intermediate_size=45)
    if family == "bert":
        return BertModel(BertConfig(**kw), add_pooling_layer=False).eval()
    return RobertaModel(RobertaConfig(pad_token_id=1, bos_token_id=0, eos_token_id=2, **kw), add_pooling_layer=False).eval()


def token_ids(gen: torch.Generator, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def model_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomize_adapters(model: nn.Module, gen: torch.Generator, scale: float = 0.5) -> None:
    """Non-zero values in every trainable parameter (at init, lambda_b / lora_B are 0)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
