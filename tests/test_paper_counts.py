"""The VeRA paper's trainable-parameter counts, reproduced by injecting into RoBERTa built from configs.

VeRA (Kopiczko et al., ICLR 2024), Table 2: query and value of every layer adapted (section 4.1);
RoBERTa-base r = 1024: 0.043M, RoBERTa-large r = 256: 0.061M trainable parameters. What is
counted, as in the paper ("the number of trainable parameters attributable to the finetuned
layers, explicitly excluding the classification head", section 4.1; ``|Theta| = L_tuned *
(d_model + r)``, section 3): the adapter vectors only, ``lambda_b`` (d_model,) and ``lambda_d``
(r,) per adapted layer; not the frozen shared projections (buffers redrawn from a seed) and not
the classifier head, which the paper trains fully and which the summary reports apart as
``other_trainable``. So base: 24 * (768 + 1024) = 43,008; large: 48 * (1024 + 256) = 61,440.

Weights are random, built from the configs (no download). RoBERTa-base is built for real on the
CPU (~2 s) and its forward at init equals the base model's; RoBERTa-large (355M parameters, with a
sequence-classification head) is built on the meta device, which allocates nothing: counting
needs shapes only.
"""

import torch
from helpers import rel_err
from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel

from pefttriton.adapters.config import VeRAConfig
from pefttriton.integration.injection import inject, trainable_parameter_summary
from pefttriton.integration.surgery import adapter_layers

ROBERTA_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
ROBERTA_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)


def _roberta(sizes: dict, device: str) -> RobertaModel:
    cfg = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, **sizes)
    with torch.device(device):
        return RobertaModel(cfg, add_pooling_layer=False).eval()


def test_roberta_base_r1024_43008(gen):
    torch.manual_seed(0)
    model = _roberta(ROBERTA_BASE, "cpu")
    ids = torch.randint(3, 1000, (1, 7), generator=gen)
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    inject(model, VeRAConfig(r=1024, target_modules=["query", "value"]))
    summary = trainable_parameter_summary(model)
    assert len(adapter_layers(model)) == 24
    assert summary.adapter == 24 * (768 + 1024) == 43_008
    assert summary.trainable == 43_008 and summary.other_trainable == 0
    assert round(summary.adapter / 1e6, 3) == 0.043  # the table's figure
    assert summary.projection_entries == 1024 * 768 + 768 * 1024  # frozen, not counted
    with torch.no_grad():  # lambda_b = 0 at init: the adapted model computes what RoBERTa does
        assert rel_err(model(input_ids=ids).last_hidden_state, before) < 1e-6


def test_roberta_large_r256_61440():
    cfg = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, num_labels=2, **ROBERTA_LARGE)
    with torch.device("meta"):
        model = RobertaForSequenceClassification(cfg)
    total_before = sum(p.numel() for p in model.parameters())
    inject(model, VeRAConfig(r=256, target_modules=["query", "value"]))
    summary = trainable_parameter_summary(model)
    assert len(adapter_layers(model)) == 48
    assert summary.adapter == 48 * (1024 + 256) == 61_440
    assert summary.trainable == 61_440  # inject froze everything else, the head included
    assert round(summary.adapter / 1e6, 3) == 0.061
    assert summary.total == total_before + 61_440
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lambda" not in n)
    # The paper trains the head fully and leaves it out of the count: the summary keeps it apart.
    model.classifier.requires_grad_(True)
    summary = trainable_parameter_summary(model)
    assert summary.adapter == 61_440
    assert summary.other_trainable == (1024 * 1024 + 1024) + (1024 * 2 + 2)  # dense + out_proj
