"""PEFT's own layer-behaviour tests for VeRA and LoRA, run with acceleration on.

Transposed from huggingface/peft's ``tests/test_custom_models.py`` (``TestPeftCustomModel``
through ``tests/testing_common.py``, ``TestMultipleActiveAdapters``, ``TestMixedAdapterBatches``)
and ``tests/test_vera.py``, at upstream 0.20.1.dev0 (commit 5d602fd, the newest test files at
hand; PEFT 0.21.2 is installed). The models, configs, inputs, training loops and tolerances are
upstream's; what changes: every PEFT model is accelerated right after PEFT builds or loads it
(``get_peft_model``, ``PeftModel.from_pretrained``), and the tests also count engine calls
(``engine_calls``) where a covered layer runs unmerged, so that "PEFT still works" cannot pass
by a silent fallback. Each test names the upstream test it mirrors.

Upstream's assertions are mostly self-consistency (merged vs unmerged, saved vs loaded, with and
without ``disable_adapter()``); accelerated, they become cross-checks between the fused engine
(unmerged, one adapter active) and PEFT's own code (merged, disabled, several adapters, mixed
batches), at upstream's tolerances.

DoRA, ``lora_bias``, dropout and several active adapters run fused. Cases that PEFT runs itself
(embeddings, Conv2d, MultiheadAttention, ``target_parameters``) are kept: there acceleration must
change nothing.
"""

import copy
import os
import pickle
import sys
import tempfile

import pytest
import torch
from helpers import rel_err
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from pefttriton.integration.acceleration import accelerate

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
    calls = []
    original = ACC.lowrank_linear

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(ACC, "lowrank_linear", counting)
    return calls


# ----------------------------------------------------------------------------- upstream's models


class MLP(nn.Module):  # test_custom_models.MLP
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


class ModelEmbConv1D(nn.Module):  # test_custom_models.ModelEmbConv1D (GPT-2's Conv1D)
    def __init__(self, emb_size=100):
        super().__init__()
        self.emb = nn.Embedding(emb_size, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = self.emb(X)
        X = self.conv1d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv2D(nn.Module):  # test_custom_models.ModelConv2D
    def __init__(self, bias=True):
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3, bias=bias)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = X.reshape(-1, 5, 3, 3)
        X = self.conv2d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelMha(nn.Module):  # test_custom_models.ModelMha
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X, _ = self.mha(X, X, X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


MODELS = {"MLP": MLP, "EmbConv1D": ModelEmbConv1D, "Conv2d": ModelConv2D, "MHA": ModelMha}


def from_pretrained(model_id, dtype=None):
    """test_custom_models.MockTransformerWrapper.from_pretrained: a fresh model (seed 0)."""
    torch.manual_seed(0)
    model = MODELS[model_id]()
    return model.to(dtype) if dtype is not None else model


def prepare_inputs_for_testing():
    return {"X": torch.arange(90).view(9, 10)}


def set_init_weights_false(config_cls, kwargs):  # testing_utils.set_init_weights_false
    kwargs = kwargs.copy()
    kwargs["init_lora_weights" if config_cls is LoraConfig else "init_weights"] = False
    return kwargs


def peft_accelerated(model, config, fused=None, **kwargs):
    """``get_peft_model`` then ``accelerate``; ``fused``: how many layers must run fused."""
    peft_model = get_peft_model(model, config, **kwargs)
    report = accelerate(peft_model)
    if fused is not None:
        assert len(report.fused) == fused, str(report)
    return peft_model


def from_pretrained_accelerated(model, path, **kwargs):
    peft_model = PeftModel.from_pretrained(model, path, **kwargs)
    accelerate(peft_model)
    return peft_model


def set_input_dtype(peft_model, dtype):
    """The dtype upstream's models cast their input to (``self.dtype``; EmbConv1D has none)."""
    base = peft_model.base_model.model
    if isinstance(getattr(base, "dtype", None), torch.dtype):
        base.dtype = dtype


def peft_reference(peft_model, model_id, config_cls, config_kwargs, **kwargs):
    """PEFT's own model (never accelerated) holding ``peft_model``'s parameters, in float64: the
    16-bit values computed exactly, by PEFT's layers (the reference of the fused engine and of
    merging in 16 bits)."""
    reference = get_peft_model(from_pretrained(model_id), config_cls(**config_kwargs), **kwargs)
    reference.load_state_dict(peft_model.state_dict())
    reference = reference.double().eval()
    set_input_dtype(reference, torch.float64)
    return reference


# max|a - ref| / max|ref| of a 16-bit model's logits against its float64 reference (peft_reference),
# fused or merged. Measured over TEST_CASES with init_weights=False (both 16-bit dtypes, adapters fp32
# or 16-bit): at most 4.7e-3 in fp16 and 3.9e-2 in bf16 (LoRA with lora_bias, merged), while leaving
# the adapter out changes the logits by 0.3 to 2.5.
TOL_16BIT = {torch.float16: 1e-2, torch.bfloat16: 6e-2}


# (test name, model id, config class, config kwargs, layers fused in eval mode); upstream's TEST_CASES
# for LoRA and VeRA on Linear / Conv1D, plus the ones that mix in layers PEFT keeps running itself.
TEST_CASES = [
    ("Vanilla MLP 1 LoRA", "MLP", LoraConfig, {"target_modules": "lin0"}, 1),
    ("Vanilla MLP 2 LoRA", "MLP", LoraConfig, {"target_modules": ["lin0"]}, 1),
    ("Vanilla MLP 3 LoRA", "MLP", LoraConfig, {"target_modules": ["lin1"]}, 1),
    ("Vanilla MLP 4 LoRA", "MLP", LoraConfig, {"target_modules": ["lin0", "lin1"]}, 2),
    ("Vanilla MLP 5 LoRA", "MLP", LoraConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}, 1),
    ("Vanilla MLP 6 LoRA", "MLP", LoraConfig, {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}, 1),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", LoraConfig, {"target_modules": ["lin0"], "use_dora": True}, 1),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP", LoraConfig,
     {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}, 2),
    ("MLP 2 using nn.Parameter LoRA", "MLP", LoraConfig, {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}, 1),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", LoraConfig, {"target_modules": ["conv1d"]}, 1),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", LoraConfig, {"target_modules": ["emb", "conv1d"]}, 1),
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D", LoraConfig,
     {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}, 1),
    ("Conv2d 2 LoRA", "Conv2d", LoraConfig, {"target_modules": ["conv2d", "lin0"]}, 1),
    ("MHA 2 LoRA", "MHA", LoraConfig, {"target_modules": ["mha", "lin0"]}, 1),
    ("Vanilla MLP 1 VeRA", "MLP", VeraConfig, {"target_modules": "lin0"}, 1),
    ("Vanilla MLP 2 VeRA", "MLP", VeraConfig, {"target_modules": ["lin0"]}, 1),
    ("Vanilla MLP 3 VeRA", "MLP", VeraConfig, {"target_modules": ["lin1"]}, 1),
    ("Vanilla MLP 4 VeRA", "MLP", VeraConfig, {"target_modules": ["lin0", "lin1"]}, 2),
    ("Vanilla MLP 5 VeRA", "MLP", VeraConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}, 1),
    ("Embedding + transformers Conv1D 1 VeRA", "EmbConv1D", VeraConfig, {"target_modules": ["conv1d"]}, 1),
]
CASE_IDS = [case[0] for case in TEST_CASES]


def _perturb_trainable_tokens(model, config_kwargs):  # PeftCommonTester.perturb_trainable_token_weights_if_used
    if "trainable_token_indices" in config_kwargs:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "trainable_tokens_delta" in name:
                    p.add_(torch.randn_like(p))


def _ran_fused(engine_calls, fused):
    assert bool(engine_calls) == bool(fused), (len(engine_calls), fused)


# ----------------------------------------------------------------------------- TestPeftCustomModel


@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs, fused", TEST_CASES, ids=CASE_IDS)
def test_merge_layers(test_name, model_id, config_cls, config_kwargs, fused, engine_calls):
    """TestPeftCustomModel.test_merge_layers (PeftCommonTester._test_merge_layers)."""
    config_kwargs = set_init_weights_false(config_cls, config_kwargs)
    model = from_pretrained(model_id)
    config = config_cls(**config_kwargs)
    model = peft_accelerated(model, config, fused)
    _perturb_trainable_tokens(model, config_kwargs)

    dummy_input = prepare_inputs_for_testing()
    model.eval()
    logits = model(**dummy_input)[0]
    _ran_fused(engine_calls, fused)

    model.merge_adapter()
    logits_merged = model(**dummy_input)[0]
    model.unmerge_adapter()
    logits_unmerged = model(**dummy_input)[0]

    model = model.merge_and_unload()
    # check that PEFT layers are completely removed
    assert not any(isinstance(module, BaseTunerLayer) for module in model.modules())
    assert not any("forward" in module.__dict__ for module in model.modules())
    logits_merged_unloaded = model(**dummy_input)[0]

    atol, rtol = 1e-4, 1e-4
    assert torch.allclose(logits, logits_merged, atol=atol, rtol=rtol)
    assert torch.allclose(logits, logits_unmerged, atol=atol, rtol=rtol)
    assert torch.allclose(logits, logits_merged_unloaded, atol=atol, rtol=rtol)

    # For this test to work, weights should not be initialized to identity transform
    transformers_model = from_pretrained(model_id)
    logits_transformers = transformers_model(**dummy_input)[0]
    assert not torch.allclose(logits_merged, logits_transformers, atol=1e-10, rtol=1e-10)

    # model is not a transformers model: a pickle round trip
    model_from_pretrained = pickle.loads(pickle.dumps(model))
    logits_merged_from_pretrained = model_from_pretrained(**dummy_input)[0]
    assert torch.allclose(logits_merged, logits_merged_from_pretrained, atol=atol, rtol=rtol)


@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs, fused", TEST_CASES, ids=CASE_IDS)
def test_merge_layers_fp16(test_name, model_id, config_cls, config_kwargs, fused, engine_calls):
    """TestPeftCustomModel.test_merge_layers_fp16. Upstream only merges ("this should simply
    work"); here the fp16 model's logits, fused before merging and after merge_and_unload, are
    also checked against PEFT's own layers in float64 (not for MHA: upstream's test_forward_float16
    runs nn.MultiheadAttention in 16 bits, see test_forward_16bit)."""
    config_kwargs = set_init_weights_false(config_cls, config_kwargs)
    model = from_pretrained(model_id, dtype=torch.float16)
    model = peft_accelerated(model, config_cls(**config_kwargs), fused)
    model = model.to(dtype=torch.float16)
    model.eval()
    X = prepare_inputs_for_testing()
    check_values = model_id != "MHA"
    if check_values:
        set_input_dtype(model, torch.float16)
        reference = peft_reference(model, model_id, config_cls, config_kwargs)
        with torch.no_grad():
            logits_ref = reference(**X)
            logits = model(**X)
        _ran_fused(engine_calls, fused)
        assert logits.dtype == torch.float16
        assert rel_err(logits, logits_ref) < TOL_16BIT[torch.float16]
    # This should simply work
    merged = model.merge_and_unload()
    if check_values:
        with torch.no_grad():
            assert rel_err(merged(**X), logits_ref) < TOL_16BIT[torch.float16]


@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs, fused", TEST_CASES, ids=CASE_IDS)
def test_merge_layers_is_idempotent(test_name, model_id, config_cls, config_kwargs, fused, engine_calls):
    """TestPeftCustomModel.test_merge_layers_is_idempotent. Merged layers run PEFT's forward, so
    upstream's test alone runs no pefttriton code. What it is for here: a second merge_adapter is a
    no-op for accelerated layers too; a merged layer keeps running PEFT's forward (the engine on
    top of the merged weight would add the adapter twice), and unmerging returns to the engine.
    The fused logits before merging are the reference."""
    config_kwargs = set_init_weights_false(config_cls, config_kwargs)
    model = peft_accelerated(from_pretrained(model_id), config_cls(**config_kwargs), fused)
    model.eval()
    torch.manual_seed(0)
    logits_fused = model(**prepare_inputs_for_testing())[0]
    _ran_fused(engine_calls, fused)
    model.merge_adapter()
    calls = len(engine_calls)
    logits_0 = model(**prepare_inputs_for_testing())[0]
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    logits_1 = model(**prepare_inputs_for_testing())[0]
    assert len(engine_calls) == calls  # merged: PEFT's forward, no engine call
    assert torch.allclose(logits_0, logits_1, atol=1e-6, rtol=1e-6)
    atol, rtol = 1e-4, 1e-4  # fused vs merged, as in test_merge_layers
    assert torch.allclose(logits_fused, logits_0, atol=atol, rtol=rtol)
    model.unmerge_adapter()
    logits_unmerged = model(**prepare_inputs_for_testing())[0]
    assert len(engine_calls) - calls == fused
    assert torch.allclose(logits_fused, logits_unmerged, atol=atol, rtol=rtol)


@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs, fused", TEST_CASES, ids=CASE_IDS)
def test_safe_merge(test_name, model_id, config_cls, config_kwargs, fused, engine_calls):
    """TestPeftCustomModel.test_safe_merge."""
    config_kwargs = set_init_weights_false(config_cls, config_kwargs)
    torch.manual_seed(0)
    model = from_pretrained(model_id).eval()
    inputs = prepare_inputs_for_testing()
    logits_base = model(**inputs)[0]

    model = peft_accelerated(model, config_cls(**config_kwargs), fused).eval()
    _perturb_trainable_tokens(model, config_kwargs)
    logits_peft = model(**inputs)[0]
    _ran_fused(engine_calls, fused)
    atol, rtol = 1e-6, 1e-6
    assert not torch.allclose(logits_base, logits_peft, atol=atol, rtol=rtol)

    model_unloaded = model.merge_and_unload(safe_merge=True)
    logits_unloaded = model_unloaded(**inputs)[0]
    if fused:  # fused vs merged: two summation orders (upstream compares PEFT with itself at 1e-6)
        atol, rtol = 1e-5, 1e-5
    assert torch.allclose(logits_peft, logits_unloaded, atol=atol, rtol=rtol)

    # Ensure that serializing with safetensors works, there was an error when weights were not contiguous
    with tempfile.TemporaryDirectory() as tmp_dirname:
        torch.save(model_unloaded.state_dict(), os.path.join(tmp_dirname, "model.bin"))
        save_file(model_unloaded.state_dict(), os.path.join(tmp_dirname, "model.safetensors"))


@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs, fused", TEST_CASES, ids=CASE_IDS)
def test_forward_output_finite(test_name, model_id, config_cls, config_kwargs, fused, engine_calls):
    """TestPeftCustomModel.test_forward_output_finite."""
    model = peft_accelerated(from_pretrained(model_id), config_cls(**config_kwargs), fused)
    model.eval()
    with torch.no_grad():
        output = model(**prepare_inputs_for_testing())
    assert torch.isfinite(output).all()
    _ran_fused(engine_calls, fused)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False], ids=["", "no_autocast"])
@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs, fused", TEST_CASES, ids=CASE_IDS)
def test_forward_16bit(test_name, model_id, config_cls, config_kwargs, fused, dtype, autocast_adapter_dtype, engine_calls):
    """TestPeftCustomModel.test_forward_float16 / _bfloat16 / _float16_no_autocast /
    _bfloat16_no_autocast (the user casts the base model; adapters fp32 or not). Upstream checks
    that nothing raises; here every forward (fused, merged, unmerged again) is also checked
    against PEFT's own layers in float64. With ``init_weights=False``: upstream's default init
    makes the adapter zero, which a fused forward that dropped it would match."""
    if model_id == "MHA":
        pytest.skip("upstream runs it; nn.MultiheadAttention in 16 bits on the CPU is not what is tested here")
    X = prepare_inputs_for_testing()
    config_kwargs = set_init_weights_false(config_cls, config_kwargs)
    model = from_pretrained(model_id, dtype=dtype)
    model.dtype = dtype
    model = peft_accelerated(model, config_cls(**config_kwargs), fused, autocast_adapter_dtype=autocast_adapter_dtype)
    model.eval()
    _perturb_trainable_tokens(model, config_kwargs)
    reference = peft_reference(model, model_id, config_cls, config_kwargs, autocast_adapter_dtype=autocast_adapter_dtype)
    with torch.no_grad():
        expected = reference(**X)

    def check(output):
        assert output.dtype == dtype
        assert rel_err(output, expected) < TOL_16BIT[dtype]

    # check that none of this raises an error, and that every output is right
    check(model(**X))
    _ran_fused(engine_calls, fused)
    model.merge_adapter(safe_merge=False)
    check(model(**X))
    model.unmerge_adapter()
    calls = len(engine_calls)
    check(model(**X))
    assert len(engine_calls) - calls == fused
    model.merge_adapter(safe_merge=True)
    check(model(**X))
    model.unmerge_adapter()
    check(model(**X))
    model = model.merge_and_unload()
    check(model(**X))


@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs, fused", TEST_CASES, ids=CASE_IDS)
def test_only_params_are_updated(test_name, model_id, config_cls, config_kwargs, fused, engine_calls):
    """TestPeftCustomModel.test_only_params_are_updated."""
    X = prepare_inputs_for_testing()
    model = peft_accelerated(from_pretrained(model_id), config_cls(**config_kwargs), fused)
    model_before = copy.deepcopy(model)

    model.train()
    lr = 1e-3 if model_id == "MHA" else 0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(3):
        optimizer.zero_grad()
        y_pred = model(**X)
        loss = y_pred.sum()
        loss.backward()
        optimizer.step()
    if "lora_dropout" not in config_kwargs:  # dropout > 0 trains through PEFT's forward
        _ran_fused(engine_calls, fused)

    tol = 1e-4
    params_before = dict(model_before.named_parameters())
    params_after = dict(model.named_parameters())
    assert params_before.keys() == params_after.keys()
    prefix = "lora_" if config_cls is LoraConfig else "vera_lambda_"
    for name, param_before in params_before.items():
        param_after = params_after[name]
        if (prefix in name) or ("modules_to_save" in name) or ("token_adapter.trainable_tokens" in name):
            if not param_after.requires_grad:
                assert torch.equal(param_before, param_after)
            else:
                assert not torch.allclose(param_before, param_after, atol=tol, rtol=tol), name
        else:
            assert torch.allclose(param_before, param_after, atol=tol, rtol=tol), name


@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs, fused", TEST_CASES, ids=CASE_IDS)
def test_save_load_roundtrip(test_name, model_id, config_cls, config_kwargs, fused, tmp_path, engine_calls):
    """TestPeftCustomModel.test_save_load_roundtrip."""
    X = prepare_inputs_for_testing()
    model = from_pretrained(model_id)
    with torch.inference_mode():
        output_base = model(**X)
    config_kwargs = set_init_weights_false(config_cls, config_kwargs)
    torch.manual_seed(0)
    model = peft_accelerated(model, config_cls(**config_kwargs), fused)
    _perturb_trainable_tokens(model, config_kwargs)
    model.eval()
    with torch.inference_mode():
        output_before = model(**X)
    atol, rtol = 1e-5, 1e-5
    assert not torch.allclose(output_base, output_before, atol=atol, rtol=rtol)

    model.save_pretrained(tmp_path)
    del model
    model = from_pretrained(model_id)
    torch.manual_seed(54321)  # ensure that the seed is different from what was used when get_peft_model was called
    model = from_pretrained_accelerated(model, tmp_path)
    with torch.inference_mode():
        output_after = model(**X)
    assert torch.allclose(output_before, output_after, atol=atol, rtol=rtol)
    _ran_fused(engine_calls, fused)


@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs, fused", TEST_CASES, ids=CASE_IDS)
def test_parameters_after_loading_model(test_name, model_id, config_cls, config_kwargs, fused):
    """TestPeftCustomModel.test_parameters_after_loading_model."""
    X = prepare_inputs_for_testing()
    model = peft_accelerated(from_pretrained(model_id), config_cls(**config_kwargs), fused)
    model.train()
    lr = 1e-3 if model_id == "MHA" else 0.1 if config_kwargs.get("use_dora") else 0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(3):
        optimizer.zero_grad()
        y_pred = model(**X)
        loss = y_pred.sum()
        loss.backward()
        optimizer.step()

    tol = 1e-4
    params_before = get_peft_model_state_dict(model)
    with tempfile.TemporaryDirectory() as tmp_dirname:
        model.save_pretrained(tmp_dirname)
        model_from_pretrained = from_pretrained_accelerated(from_pretrained(model_id), tmp_dirname)
        params_after = get_peft_model_state_dict(model_from_pretrained)
        assert params_before.keys() == params_after.keys()
        for name, param_before in params_before.items():
            assert torch.allclose(param_before, params_after[name], atol=tol, rtol=tol)


@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs, fused", TEST_CASES, ids=CASE_IDS)
def test_disable_adapters(test_name, model_id, config_cls, config_kwargs, fused, engine_calls):
    """TestPeftCustomModel.test_disable_adapters."""
    X = prepare_inputs_for_testing()
    model = from_pretrained(model_id).eval()
    outputs_base = model(**X)
    model = peft_accelerated(model, config_cls(**config_kwargs), fused)
    model.eval()
    outputs_before = model(**X)
    assert torch.allclose(outputs_base, outputs_before)

    model.train()
    lr = 0.01 if model_id != "EmbConv1D" else 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(3):
        optimizer.zero_grad()
        y_pred = model(**X)
        y = torch.arange(len(y_pred)) % 2
        loss = nn.functional.nll_loss(y_pred, y)
        loss.backward()
        optimizer.step()

    model.eval()
    calls = len(engine_calls)
    outputs_after = model(**X)
    assert len(engine_calls) - calls == fused
    with model.disable_adapter():
        outputs_disabled = model(**X)
    assert len(engine_calls) - calls == fused  # disabled: PEFT runs the base layers alone
    outputs_enabled_after_disable = model(**X)

    rtol, atol = 1e-8, 1e-8  # LayerNorm is running float32 on cpu
    assert not torch.allclose(outputs_before, outputs_after, rtol=rtol, atol=atol)
    assert torch.allclose(outputs_before, outputs_disabled)
    assert torch.allclose(outputs_after, outputs_enabled_after_disable)


@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs, fused", TEST_CASES, ids=CASE_IDS)
def test_disable_adapters_with_merging(test_name, model_id, config_cls, config_kwargs, fused):
    """TestPeftCustomModel.test_disable_adapters_with_merging."""
    X = prepare_inputs_for_testing()
    model = peft_accelerated(from_pretrained(model_id), config_cls(**config_kwargs), fused)
    model.eval()
    outputs_before = model(**X)

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        y_pred = model(**X)
        y = torch.arange(len(y_pred)) % 2
        loss = nn.functional.nll_loss(y_pred, y)
        loss.backward()
        optimizer.step()

    model.eval()
    outputs_unmerged = model(**X)  # fused
    model.merge_adapter()
    outputs_after = model(**X)  # PEFT, merged
    with model.disable_adapter():
        outputs_disabled = model(**X)
    outputs_enabled_after_disable = model(**X)

    atol, rtol = 1e-5, 1e-5  # tolerances higher than defaults since merging introduces some numerical instability
    if config_kwargs.get("use_dora") and model_id == "EmbConv1D":
        atol, rtol = 1e-4, 1e-4
    assert not torch.allclose(outputs_before, outputs_after, atol=atol, rtol=rtol)
    assert torch.allclose(outputs_after, outputs_unmerged, atol=atol, rtol=rtol)
    assert torch.allclose(outputs_before, outputs_disabled, atol=atol, rtol=rtol)
    assert torch.allclose(outputs_after, outputs_enabled_after_disable, atol=atol, rtol=rtol)


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs, fused", TEST_CASES, ids=CASE_IDS)
def test_save_pretrained(test_name, model_id, config_cls, config_kwargs, fused, safe_serialization, tmp_path):
    """TestPeftCustomModel.test_save_pretrained / test_save_pretrained_pickle
    (PeftCommonTester._test_save_pretrained)."""
    model = peft_accelerated(from_pretrained(model_id), config_cls(**config_kwargs), fused)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    model_from_pretrained = from_pretrained_accelerated(from_pretrained(model_id), tmp_path)
    state_dict = get_peft_model_state_dict(model)
    state_dict_from_pretrained = get_peft_model_state_dict(model_from_pretrained)
    assert state_dict.keys() == state_dict_from_pretrained.keys()
    for key in state_dict:
        assert torch.allclose(state_dict[key], state_dict_from_pretrained[key])
    target_adapter_filename = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert os.path.exists(tmp_path / target_adapter_filename)
    assert os.path.exists(tmp_path / "adapter_config.json")
    assert not os.path.exists(tmp_path / "model.safetensors")
    assert not os.path.exists(tmp_path / "config.json")
    assert os.path.exists(tmp_path / "README.md")


@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs, fused", TEST_CASES, ids=CASE_IDS)
def test_load_multiple_adapters(test_name, model_id, config_cls, config_kwargs, fused, tmp_path, engine_calls):
    """TestPeftCustomModel.test_load_multiple_adapters (+ a forward with each loaded adapter)."""
    model = peft_accelerated(from_pretrained(model_id), config_cls(**config_kwargs), fused)
    model.save_pretrained(tmp_path)
    del model
    model = from_pretrained_accelerated(from_pretrained(model_id), tmp_path)
    load_result1 = model.load_adapter(tmp_path, adapter_name="other")
    load_result2 = model.load_adapter(tmp_path, adapter_name="yet-another")
    assert load_result1.missing_keys == []
    assert load_result2.missing_keys == []
    model.eval()
    outputs = []
    for name in ("default", "other", "yet-another"):
        model.set_adapter(name)
        outputs.append(model(**prepare_inputs_for_testing()))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert len(engine_calls) == 3 * fused


# ----------------------------------------------------------------------------- TestMultipleActiveAdapters

MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    ("LoRA Same", {"target_modules": ["lin0"], "init_lora_weights": False}, {"target_modules": ["lin0"], "init_lora_weights": False}),
    ("LoRA Different", {"target_modules": ["lin0"], "init_lora_weights": False}, {"target_modules": ["lin1"], "init_lora_weights": False}),
]


def set_multiple_active_adapters(model, adapter_names):
    from peft.utils.other import AuxiliaryTrainingWrapper

    for module in model.modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            module.set_adapter(adapter_names)


@pytest.mark.parametrize("test_name, config_kwargs_1, config_kwargs_2", MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES)
def test_multiple_active_adapters_forward(test_name, config_kwargs_1, config_kwargs_2, engine_calls):
    """TestMultipleActiveAdapters.test_multiple_active_adapters_forward: two active adapters run
    fused (one call per layer over their concatenated ranks) and agree with PEFT's own forward of
    the same combination, and with the "cat" weighted adapter equal to them."""
    torch.manual_seed(0)
    model = MLP(bias=True).eval()
    X = prepare_inputs_for_testing()
    peft_model = peft_accelerated(model, LoraConfig(**config_kwargs_1), adapter_name="adapter_1")
    peft_model.add_adapter("adapter_2", LoraConfig(**config_kwargs_2))
    accelerate(peft_model)  # a new target layer ("LoRA Different") is a new module

    peft_model.set_adapter("adapter_1")
    adapter_1_output = peft_model(**X)
    peft_model.set_adapter("adapter_2")
    adapter_2_output = peft_model(**X)
    set_multiple_active_adapters(peft_model, ["adapter_1", "adapter_2"])
    calls = len(engine_calls)
    combined_output = peft_model(**X)
    assert calls == 2 and len(engine_calls) > calls  # the combination: fused
    accelerate(peft_model, enabled=False)
    assert torch.allclose(peft_model(**X), combined_output, atol=1e-5)  # PEFT's own sum of the two
    accelerate(peft_model)

    assert not torch.allclose(adapter_1_output, adapter_2_output, atol=1e-5)
    assert not torch.allclose(adapter_1_output, combined_output, atol=1e-5)
    assert not torch.allclose(adapter_2_output, combined_output, atol=1e-5)

    peft_model.add_weighted_adapter(["adapter_1", "adapter_2"], [1.0, 1.0], "new_combined_adapter", combination_type="cat")
    peft_model.set_adapter("new_combined_adapter")
    new_combined_output = peft_model(**X)
    assert len(engine_calls) > calls  # the weighted adapter: fused
    assert torch.allclose(new_combined_output, combined_output, atol=1e-5)


@pytest.mark.parametrize("test_name, config_kwargs_1, config_kwargs_2", MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES)
def test_multiple_active_adapters_merge_and_unmerge(test_name, config_kwargs_1, config_kwargs_2):
    """TestMultipleActiveAdapters.test_multiple_active_adapters_merge_and_unmerge."""
    torch.manual_seed(0)
    model = MLP(bias=True).eval()
    X = prepare_inputs_for_testing()
    base_output = model(**X)
    peft_model = peft_accelerated(model, LoraConfig(**config_kwargs_1), adapter_name="adapter_1").eval()
    peft_model.add_adapter("adapter_2", LoraConfig(**config_kwargs_2))
    accelerate(peft_model)
    set_multiple_active_adapters(peft_model, ["adapter_1", "adapter_2"])
    combined_output = peft_model(**X)
    peft_model.merge_adapter()
    merged_combined_output = peft_model(**X)
    assert torch.allclose(merged_combined_output, combined_output, atol=1e-4)
    peft_model.unmerge_adapter()
    with peft_model.disable_adapter():
        disabled_adapter_output = peft_model(**X)
    assert torch.allclose(disabled_adapter_output, base_output, atol=1e-4)


# ----------------------------------------------------------------------------- TestMixedAdapterBatches


def run_mixed_batch_checks(model, inputs, engine_calls):
    """TestMixedAdapterBatches.run_checks: base / adapter0 / adapter1 outputs (fused where
    covered) against one mixed batch (``adapter_names=``: PEFT's code)."""
    adapter_name0, adapter_name1 = model.peft_config.keys()
    with model.disable_adapter():
        output_base = model(**inputs)
    model.set_adapter(adapter_name0)
    output0 = model(**inputs)
    assert not torch.allclose(output_base, output0)
    model.set_adapter(adapter_name1)
    output1 = model(**inputs)
    assert len(output_base) >= 3
    assert len(output_base) == len(output0) == len(output1)
    assert not torch.allclose(output_base, output0)
    assert not torch.allclose(output_base, output1)
    assert engine_calls
    calls = len(engine_calls)

    adapters = ["__base__", adapter_name0, adapter_name1]
    inputs["adapter_names"] = [adapters[i % 3] for i in (range(len(inputs["X"])))]
    output_mixed = model.forward(**inputs)
    assert len(engine_calls) == calls
    assert torch.allclose(output_base[::3], output_mixed[::3])
    assert torch.allclose(output0[1::3], output_mixed[1::3])
    assert torch.allclose(output1[2::3], output_mixed[2::3])


MIXED_CASES = [
    ("LoRA mixed adapter", "MLP", LoraConfig(target_modules=["lin0"], init_lora_weights=False),
     LoraConfig(target_modules=["lin0"], r=16, init_lora_weights=False)),
    ("LoRA mixed adapter with different target layers", "MLP", LoraConfig(target_modules=["lin0"], init_lora_weights=False),
     LoraConfig(target_modules=["lin1"], init_lora_weights=False)),
    ("LoRA mixed adapter with modules to save", "MLP",
     LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], init_lora_weights=False),
     LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], init_lora_weights=False)),
    ("LoRA mixed adapter with conv1d and emb", "EmbConv1D", LoraConfig(target_modules=["emb", "conv1d"], init_lora_weights=False),
     LoraConfig(target_modules=["emb", "conv1d"], r=16, init_lora_weights=False)),
]


@pytest.mark.parametrize("test_name, model_id, config0, config1", MIXED_CASES, ids=[c[0] for c in MIXED_CASES])
def test_mixed_adapter_batches(test_name, model_id, config0, config1, engine_calls):
    """TestMixedAdapterBatches.test_mixed_adapter_batches_mlp / _different_target_layers /
    _multiple_modules_to_save / _lora_conv1d_emb."""
    base_model = from_pretrained(model_id).eval()
    peft_model = peft_accelerated(base_model, config0, adapter_name="adapter0").eval()
    peft_model.add_adapter("adapter1", config1)
    accelerate(peft_model)
    run_mixed_batch_checks(peft_model, {"X": torch.arange(90).view(-1, 10)}, engine_calls)


# ----------------------------------------------------------------------------- test_vera.py::TestVera


class VeraMLP(nn.Module):  # test_vera.MLP
    def __init__(self, bias=True):
        super().__init__()
        self.relu = nn.ReLU()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.lin1 = nn.Linear(20, 20, bias=bias)  # lin1 and lin2 have same shape
        self.lin2 = nn.Linear(20, 20, bias=bias)
        self.lin3 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = self.lin0(X)
        X = self.relu(X)
        X = self.lin1(X)
        X = self.relu(X)
        X = self.lin2(X)
        X = self.relu(X)
        X = self.lin3(X)
        X = self.sm(X)
        return X


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return VeraMLP()


@pytest.fixture
def mlp_same_prng(mlp):
    torch.manual_seed(0)
    config = VeraConfig(target_modules=["lin1", "lin2"], init_weights=False)
    peft_model = peft_accelerated(mlp, config, fused=2)
    config2 = VeraConfig(target_modules=["lin1", "lin2"], init_weights=False)
    peft_model.add_adapter("other", config2)
    return peft_model


def test_vera_multiple_adapters_same_prng_weights(mlp_same_prng, engine_calls):
    """TestVera.test_multiple_adapters_same_prng_weights."""
    lin1, lin2 = mlp_same_prng.base_model.model.lin1, mlp_same_prng.base_model.model.lin2
    assert lin1.vera_A["default"] is lin1.vera_A["other"]
    assert lin1.vera_B["default"] is lin1.vera_B["other"]
    assert lin2.vera_A["default"] is lin2.vera_A["other"]
    assert lin2.vera_B["default"] is lin2.vera_B["other"]
    input = torch.randn(5, 10)
    mlp_same_prng.set_adapter("default")
    output_default = mlp_same_prng(input)
    mlp_same_prng.set_adapter("other")
    output_other = mlp_same_prng(input)
    assert not torch.allclose(output_default, output_other, atol=1e-3, rtol=1e-3)
    assert len(engine_calls) == 4


def test_vera_multiple_adapters_different_prng_raises():
    """TestVera.test_multiple_adapters_different_prng_raises."""
    model = VeraMLP()
    config = VeraConfig(target_modules=["lin1", "lin2"], init_weights=False)
    peft_model = peft_accelerated(model, config, fused=2)
    config2 = VeraConfig(target_modules=["lin1", "lin2"], init_weights=False, projection_prng_key=123)
    msg = (
        r"Vera PRNG initialisation key must be the same for all adapters. Got config.projection_prng_key=123 but "
        r"previous config had 0"
    )
    with pytest.raises(ValueError, match=msg):
        peft_model.add_adapter("other", config2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vera_save_projection_true_restores_saved_projections(mlp, tmp_path, dtype, engine_calls):
    """TestVera.test_save_projection_true_restores_saved_projections (also on a bf16 model, where
    the accelerated layers use a cached bf16 cast of the projections: changed in place, it must
    follow)."""
    torch.manual_seed(1)
    config = VeraConfig(target_modules=["lin1", "lin2"], init_weights=False, save_projection=True)
    peft_model = peft_accelerated(mlp.to(dtype), config, fused=2)
    input = torch.randn(5, 10).to(dtype)
    peft_model(input)  # the projections as drawn (cached in bf16)
    with torch.no_grad():
        peft_model.base_model.vera_A["default"] += 1.0
        peft_model.base_model.vera_B["default"] += 1.0
    output = peft_model(input)
    peft_model.save_pretrained(tmp_path)

    torch.manual_seed(0)
    peft_model_loaded = from_pretrained_accelerated(VeraMLP().to(dtype), tmp_path)
    torch.testing.assert_close(peft_model_loaded.base_model.vera_A["default"], peft_model.base_model.vera_A["default"])
    torch.testing.assert_close(peft_model_loaded.base_model.vera_B["default"], peft_model.base_model.vera_B["default"])
    output_loaded = peft_model_loaded(input)
    torch.testing.assert_close(output_loaded, output)
    assert len(engine_calls) == 6
    if dtype == torch.bfloat16:  # and it is what PEFT computes from the changed projections
        accelerate(peft_model, enabled=False)
        torch.testing.assert_close(peft_model(input), output, atol=2e-2, rtol=2e-2)


def test_vera_multiple_adapters_save_load_save_projection_false(mlp, tmp_path, engine_calls):
    """TestVera.test_multiple_adapters_save_load_save_projection_false."""
    torch.manual_seed(1)
    config = VeraConfig(target_modules=["lin1", "lin2"], init_weights=False, save_projection=False)
    peft_model = peft_accelerated(mlp, config, fused=2, adapter_name="first")
    config2 = VeraConfig(target_modules=["lin1", "lin2"], init_weights=False, save_projection=False)
    peft_model.add_adapter("second", config2)

    input = torch.randn(5, 10)
    peft_model.set_adapter("first")
    output_first = peft_model(input)
    peft_model.set_adapter("second")
    output_second = peft_model(input)
    assert not torch.allclose(output_first, output_second, atol=1e-3, rtol=1e-3)

    save_path = tmp_path / "vera"
    peft_model.save_pretrained(save_path)
    assert os.path.exists(save_path / "first" / "adapter_config.json")
    assert os.path.exists(save_path / "second" / "adapter_config.json")

    torch.manual_seed(0)
    mlp = VeraMLP()
    peft_model = from_pretrained_accelerated(mlp, save_path / "first", adapter_name="first")
    peft_model.load_adapter(save_path / "second", "second")
    peft_model.set_adapter("first")
    output_first_loaded = peft_model(input)
    peft_model.set_adapter("second")
    output_second_loaded = peft_model(input)
    assert torch.allclose(output_first, output_first_loaded, atol=1e-3, rtol=1e-3)
    assert torch.allclose(output_second, output_second_loaded, atol=1e-3, rtol=1e-3)
    assert len(engine_calls) == 8


def test_vera_multiple_adapters_save_projection_false_contains_no_vera_A_vera_B(mlp, tmp_path):
    """TestVera.test_multiple_adapters_save_projection_false_contains_no_vera_A_vera_B."""
    torch.manual_seed(1)
    config = VeraConfig(target_modules=["lin1", "lin2"], init_weights=False, save_projection=False)
    peft_model = peft_accelerated(mlp, config, fused=2, adapter_name="first")
    config2 = VeraConfig(target_modules=["lin1", "lin2"], init_weights=False, save_projection=False)
    peft_model.add_adapter("second", config2)
    save_path = tmp_path / "vera"
    peft_model.save_pretrained(save_path)
    for adapter in ("first", "second"):
        with safe_open(save_path / adapter / "adapter_model.safetensors", framework="pt", device="cpu") as f:
            keys = list(f.keys())
        assert not any("vera_A" in key for key in keys)
        assert not any("vera_B" in key for key in keys)


def test_vera_A_vera_B_share_memory(mlp_same_prng):
    """TestVera.test_vera_A_vera_B_share_memory: acceleration copies nothing."""
    mlp_same_prng(torch.randn(5, 10))
    vera_A = mlp_same_prng.vera_A["default"]
    vera_B = mlp_same_prng.vera_B["default"]
    assert vera_A.data_ptr() == mlp_same_prng.base_model.model.lin1.vera_A["default"].data_ptr()
    assert vera_B.data_ptr() == mlp_same_prng.base_model.model.lin1.vera_B["default"].data_ptr()
    assert vera_A.data_ptr() == mlp_same_prng.base_model.model.lin2.vera_A["default"].data_ptr()
    assert vera_B.data_ptr() == mlp_same_prng.base_model.model.lin2.vera_B["default"].data_ptr()
    assert vera_A.data_ptr() != vera_B.data_ptr()


def test_vera_lambda_dont_share_memory(mlp_same_prng):
    """TestVera.test_vera_lambda_dont_share_memory."""
    lin1, lin2 = mlp_same_prng.base_model.model.lin1, mlp_same_prng.base_model.model.lin2
    assert lin1.vera_lambda_b["default"].data_ptr() != lin1.vera_lambda_b["other"].data_ptr()
    assert lin1.vera_lambda_b["default"].data_ptr() != lin2.vera_lambda_b["default"].data_ptr()
    assert lin1.vera_lambda_b["other"].data_ptr() != lin2.vera_lambda_b["other"].data_ptr()
    assert lin1.vera_lambda_d["default"].data_ptr() != lin1.vera_lambda_d["other"].data_ptr()
    assert lin1.vera_lambda_d["default"].data_ptr() != lin2.vera_lambda_d["default"].data_ptr()
    assert lin1.vera_lambda_d["other"].data_ptr() != lin2.vera_lambda_d["other"].data_ptr()


def test_vera_different_shapes(mlp, engine_calls):
    """TestVera.test_vera_different_shapes: each layer slices the shared projections to its shape."""
    config = VeraConfig(target_modules=["lin0", "lin3"], init_weights=False)
    reference = get_peft_model(copy.deepcopy(mlp), config)
    mlp_different_shapes = peft_accelerated(mlp, config, fused=2)
    vera_A = mlp_different_shapes.vera_A["default"]
    vera_B = mlp_different_shapes.vera_B["default"]
    assert mlp.lin0.base_layer.weight.shape != mlp.lin3.base_layer.weight.shape
    # vera_A: (rank, largest_in), vera_B: (largest_out, rank)
    assert vera_A.shape == (config.r, mlp.lin3.in_features)
    assert vera_B.shape == (mlp.lin0.out_features, config.r)
    input = torch.randn(5, 10)
    output = mlp_different_shapes(input)  # should not raise
    assert len(engine_calls) == 2
    reference.load_state_dict(mlp_different_shapes.state_dict())
    torch.testing.assert_close(output, reference(input))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_vera_dtypes(dtype, engine_calls):
    """TestVera.test_vera_dtypes."""
    model = VeraMLP().to(dtype)
    config = VeraConfig(target_modules=["lin1", "lin2"], init_weights=False)
    peft_model = peft_accelerated(model, config, fused=2)
    inputs = torch.randn(5, 10).to(dtype)
    output = peft_model(inputs)  # should not raise
    assert output.dtype == dtype
    assert len(engine_calls) == 2
