"""pefttriton's own adapter files: only trainable tensors (+ the VeRA seed), bit-exact round trip."""

import copy

import pytest
import torch
from torch import nn
from safetensors import safe_open
from helpers import model_output, randomize_adapters, tiny_gpt2, tiny_llama, token_ids

from pefttriton.adapters.config import LoRAConfig, LoRMAConfig, VeRAConfig
from pefttriton.integration.injection import inject
from pefttriton.integration.surgery import adapter_layers
from pefttriton.integration.save import load_adapter, read_adapter, save_adapter
from pefttriton.adapters.vera import VeRAProjections


def _randomize(model, gen):
    randomize_adapters(model, gen, scale=1.0)


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
    for (name, layer), (name2, layer2) in zip(adapter_layers(original), adapter_layers(loaded)):
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
    names = [name for name, _ in adapter_layers(model)]
    # only lambda_d (5,) and lambda_b (out,), fp32: no projections, no frozen weights
    assert _file_keys(tmp_path / "a.safetensors") == {f"{n}.{v}" for n in names for v in ("lambda_d", "lambda_b")}
    assert stats["tensors"] == 12 and stats["bytes"] == 4 * 2 * ((5 + 30) + (5 + 10) + (5 + 30))
    _, meta = read_adapter(tmp_path / "a.safetensors")
    assert meta["projections"] == [{"r": 5, "max_in": 45, "max_out": 30, "seed": 9, "stored": False}]
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors")
    # one shared pair again, redrawn from the seed
    assert len({id(layer.projections) for _, layer in adapter_layers(loaded)}) == 1
    _assert_bit_identical(loaded, model, token_ids(gen))


def test_vera_projections_stored_when_not_redrawable(tmp_path, gen):
    base = tiny_llama()
    model = inject(copy.deepcopy(base), VeRAConfig(r=3, target_modules=["q_proj"]))
    _randomize(model, gen)
    with torch.no_grad():  # e.g. projections loaded from a PEFT checkpoint drawn elsewhere: both differ
        adapter_layers(model)[0][1].projections.vera_A.mul_(1.5)
        adapter_layers(model)[0][1].projections.vera_B.mul_(-0.5)
    save_adapter(model, tmp_path / "a.safetensors")
    keys = _file_keys(tmp_path / "a.safetensors")
    assert {"__projections__.0.vera_A", "__projections__.0.vera_B"} <= keys
    # into a plain model and into one whose VeRA layers hold the seed's draw: both halves come back
    _assert_bit_identical(load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors"), model, token_ids(gen))
    target = inject(copy.deepcopy(base), VeRAConfig(r=3, target_modules=["q_proj"]))
    _assert_bit_identical(load_adapter(target, tmp_path / "a.safetensors"), model, token_ids(gen))


def test_head_merged_layer_and_existing_fused_layers(tmp_path, gen):
    base = tiny_llama()
    model = inject(copy.deepcopy(base), VeRAConfig(r=4, target_modules=["q_proj"]))
    inject(model, LoRAConfig(r=2, target_modules=["up_proj"]))
    model.lm_head.weight.requires_grad_(True)  # a head trained along
    _randomize(model, gen)
    adapter_layers(model)[0][1].merge()
    save_adapter(model, tmp_path / "a.safetensors")
    assert "lm_head.weight" in _file_keys(tmp_path / "a.safetensors")
    assert "model.embed_tokens.weight" not in _file_keys(tmp_path / "a.safetensors")
    # into a plain model
    _assert_bit_identical(load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors"), model, token_ids(gen))
    # into a model that already holds fused layers of the same kinds (fresh values)
    target = inject(copy.deepcopy(base), VeRAConfig(r=4, target_modules=["q_proj"]))
    inject(target, LoRAConfig(r=2, target_modules=["up_proj"]))
    _assert_bit_identical(load_adapter(target, tmp_path / "a.safetensors"), model, token_ids(gen))


def test_load_into_merged_layers(tmp_path, gen):
    """Loading into fused layers that are merged (other adapter values, every adapter type): each
    ends unmerged, holds the file's tensors bit for bit, and its base weight is W0 again, so the
    model computes what the saved one does. Additive layers unmerge by subtraction and LoRMA plus by
    the Woodbury identity (W0 within rounding); LoRMA naive keeps a copy (W0 exactly)."""
    from pefttriton.adapters.config import DeepLoRAConfig

    from helpers import rel_err

    base = tiny_llama()
    configs = [
        VeRAConfig(r=4, target_modules=["q_proj"]), LoRAConfig(r=2, target_modules=["v_proj"]),
        DeepLoRAConfig(r=2, target_modules=["gate_proj"]), LoRMAConfig(r=2, alpha=0.5, variant="plus", target_modules=["up_proj"]),
        LoRMAConfig(r=2, variant="naive", target_modules=["o_proj"]),
    ]

    def build(seed):
        model = copy.deepcopy(base)
        for config in configs:
            inject(model, config)
        randomize_adapters(model, torch.Generator().manual_seed(seed), scale=0.1)  # with alpha 0.5: LoRMA plus T near I
        return model.eval()

    saved = build(1)
    save_adapter(saved, tmp_path / "a.safetensors")
    target = build(2)
    for _, layer in adapter_layers(target):
        layer.merge()
    assert any(layer.base_weight_copy is None for _, layer in adapter_layers(target) if hasattr(layer, "lorma_A"))
    load_adapter(target, tmp_path / "a.safetensors")
    base_weights = dict(base.named_parameters())
    for (name, layer), (_, want) in zip(adapter_layers(target), adapter_layers(saved)):
        assert not layer.merged, name
        for pname, p in layer.adapter_parameters().items():
            assert torch.equal(p, want.adapter_parameters()[pname]), f"{name}.{pname}"
        w0 = base_weights[f"{name}.weight"]
        assert rel_err(layer.base_layer.weight, w0) < 1e-6, name
        if getattr(layer, "variant", None) == "naive":
            assert torch.equal(layer.base_layer.weight, w0), name
    ids = token_ids(gen)
    with torch.no_grad():
        assert rel_err(model_output(target, ids), model_output(saved, ids)) < 1e-5


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
    assert isinstance(adapter_layers(model)[0][1].projections, VeRAProjections)


def test_unreadable_files_named(tmp_path):
    """A file that is not safetensors, one cut short, and metadata that is not JSON: ValueError
    naming the file and saying why (not safetensors' own error from deep inside); nothing changes."""
    model = inject(tiny_llama(), VeRAConfig(r=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a.safetensors")
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    (tmp_path / "cut.safetensors").write_bytes(data[:-5])
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "json.safetensors"), metadata={"pefttriton": "{not json"})
    target = inject(tiny_llama(), VeRAConfig(r=4, target_modules=["q_proj"]))
    before = _snapshot(target)
    for name, pattern in (
        ("text", r"text\.safetensors is not a readable safetensors file"),
        ("cut", r"cut\.safetensors is not a readable safetensors file"),
        ("json", r"json\.safetensors: the 'pefttriton' metadata is not valid JSON"),
    ):
        with pytest.raises(ValueError, match=pattern):
            load_adapter(target, tmp_path / f"{name}.safetensors")
        with pytest.raises(ValueError, match=pattern):
            read_adapter(tmp_path / f"{name}.safetensors")
    _assert_unchanged(target, before)


# ------------------------------------------------------------------------------ settings restored


def _rewrite(src, dst, edit_meta=None, edit_tensors=None):
    """Copy the adapter file ``src`` to ``dst`` with its metadata and/or tensors edited in place."""
    import json

    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["pefttriton"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if edit_meta is not None:
        edit_meta(meta)
    if edit_tensors is not None:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata={"pefttriton": json.dumps(meta)})
    return dst


# The config saved, a config for a model that already holds fused layers with other settings
# (same type and rank), and the settings every loaded layer must end up with, written out by hand
# from the saved config. (Every adapter's settings, its merged flag and a bit-exact round trip, into
# a plain model and onto fused layers, with an nn.Linear and a GPT-2 Conv1D:
# tests/test_adapter_contract.py::test_save_load_round_trip_is_bit_exact.)
_LORA_SETTINGS = (  # rsLoRA: scale = alpha / sqrt(r) = 6 / 2
    LoRAConfig(r=4, lora_alpha=6.0, lora_dropout=0.2, use_rslora=True, target_modules=["q_proj", "up_proj"]),
    LoRAConfig(r=4, lora_alpha=8.0, target_modules=["q_proj", "up_proj"]),
    {"alpha": 6.0, "dropout": 0.2, "use_rslora": True, "scale": 3.0},
)


@pytest.mark.parametrize("into", ["plain", "fused"])
def test_lora_settings_and_dropout_restored(tmp_path, gen, into):
    """LoRA's settings, its scale and its dropout module come back, into a plain model and onto
    fused layers that hold other values; a layer saved merged is merged with the restored
    settings; in training, the same dropout draws give the same outputs."""
    saved_cfg, other_cfg, expected = _LORA_SETTINGS
    base = tiny_llama()
    model = inject(copy.deepcopy(base), saved_cfg).eval()
    _randomize(model, gen)
    adapter_layers(model)[0][1].merge()
    save_adapter(model, tmp_path / "a.safetensors")
    target = copy.deepcopy(base) if into == "plain" else inject(copy.deepcopy(base), other_cfg).eval()
    loaded = load_adapter(target, tmp_path / "a.safetensors").eval()
    layers = adapter_layers(loaded)
    assert len(layers) == 4
    for name, layer in layers:
        for attr, value in expected.items():
            assert getattr(layer, attr) == value, (name, attr)
        # as the constructor makes it for dropout 0.2
        assert isinstance(layer.lora_dropout, torch.nn.Dropout) and layer.lora_dropout.p == 0.2
    _assert_bit_identical(loaded, model, token_ids(gen))
    model.train(), loaded.train()
    ids = token_ids(gen)
    torch.manual_seed(5)
    want = model_output(model, ids)
    torch.manual_seed(5)
    got = model_output(loaded, ids)
    assert torch.equal(got, want)
    model.eval()
    torch.manual_seed(5)
    assert not torch.equal(model_output(loaded, ids), model_output(model, ids))  # dropout was active


def test_lora_dropout_zero_restored_as_identity(tmp_path, gen):
    base = tiny_llama()
    model = inject(copy.deepcopy(base), LoRAConfig(r=2, target_modules=["v_proj"])).eval()
    _randomize(model, gen)
    save_adapter(model, tmp_path / "a.safetensors")
    target = inject(copy.deepcopy(base), LoRAConfig(r=2, lora_dropout=0.3, target_modules=["v_proj"])).eval()
    loaded = load_adapter(target, tmp_path / "a.safetensors")
    for _, layer in adapter_layers(loaded):
        assert layer.dropout == 0.0 and isinstance(layer.lora_dropout, torch.nn.Identity)
    loaded.train(), model.train()  # no dropout left: training outputs equal too
    ids = token_ids(gen)
    assert torch.equal(model_output(loaded, ids), model_output(model, ids))


def test_vera_d_initial_in_metadata(tmp_path):
    model = inject(tiny_llama(), VeRAConfig(r=4, d_initial=0.37, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a.safetensors")
    _, meta = read_adapter(tmp_path / "a.safetensors")
    assert meta["format_version"] == 1
    assert all(spec["kwargs"] == {"d_initial": 0.37} for spec in meta["layers"].values())


def test_lorma_variant_mismatch_refused(tmp_path):
    base = tiny_llama()
    model = inject(copy.deepcopy(base), LoRMAConfig(r=3, variant="plus", target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a.safetensors")
    target = inject(copy.deepcopy(base), LoRMAConfig(r=3, variant="naive", target_modules=["q_proj"]))
    before = _snapshot(target)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*variant='naive'.*variant='plus'"):
        load_adapter(target, tmp_path / "a.safetensors")
    _assert_unchanged(target, before)


# ------------------------------------------------------------------------------ older files


def test_file_without_new_fields_loads_as_before(tmp_path, gen):
    """A file whose metadata lacks the settings (VeRA's d_initial, older than this format; the
    others stripped by hand) loads as it always did: constructor defaults for injected layers,
    the layer's own values for reused ones."""
    base = tiny_llama()
    model = inject(copy.deepcopy(base), VeRAConfig(r=4, d_initial=0.37, target_modules=["q_proj"]))
    inject(model, LoRAConfig(r=2, lora_alpha=5.0, lora_dropout=0.1, target_modules=["v_proj"]))
    model.eval()
    _randomize(model, gen)

    def strip(meta):
        for spec in meta["layers"].values():
            spec["kwargs"] = {}
            spec.pop("scale", None)

    save_adapter(model, tmp_path / "new.safetensors")
    old = _rewrite(tmp_path / "new.safetensors", tmp_path / "old.safetensors", edit_meta=strip)
    plain = load_adapter(copy.deepcopy(base), old).eval()
    for name, layer in adapter_layers(plain):
        if "q_proj" in name:
            assert layer.d_initial == 0.1  # FusedVeRALinear's default
        else:
            assert (layer.alpha, layer.scale, layer.dropout) == (8.0, 4.0, 0.0)  # FusedLoRALinear's defaults
    # The adapter tensors are the file's: with the saved settings put back by hand, outputs agree.
    for (_, layer), (_, want) in zip(adapter_layers(plain), adapter_layers(model)):
        if hasattr(layer, "alpha"):
            layer.alpha = want.alpha
    with torch.no_grad():
        ids = token_ids(gen)
        assert torch.equal(model_output(plain, ids), model_output(model, ids))
    target = inject(copy.deepcopy(base), VeRAConfig(r=4, d_initial=0.25, target_modules=["q_proj"]))
    inject(target, LoRAConfig(r=2, lora_alpha=3.0, lora_dropout=0.4, target_modules=["v_proj"]))
    load_adapter(target, old)
    for name, layer in adapter_layers(target):
        if "q_proj" in name:
            assert layer.d_initial == 0.25
        else:
            assert (layer.alpha, layer.scale, layer.dropout) == (3.0, 1.5, 0.4)


def test_older_lora_scale_read_as_use_rslora(tmp_path, gen):
    """Older files held LoRA's scale beside its kwargs: alpha / sqrt(r) comes back as use_rslora."""
    base = tiny_llama()
    model = inject(copy.deepcopy(base), LoRAConfig(r=4, lora_alpha=6.0, use_rslora=True, target_modules=["v_proj"]))
    model.eval()
    _randomize(model, gen)

    def to_old(meta):
        for spec in meta["layers"].values():
            del spec["kwargs"]["use_rslora"]
            spec["scale"] = 3.0

    save_adapter(model, tmp_path / "new.safetensors")
    old = _rewrite(tmp_path / "new.safetensors", tmp_path / "old.safetensors", edit_meta=to_old)
    loaded = load_adapter(copy.deepcopy(base), old).eval()
    assert all(layer.use_rslora and layer.scale == 3.0 for _, layer in adapter_layers(loaded))

    def bad_scale(meta):
        to_old(meta)
        next(iter(meta["layers"].values()))["scale"] = 2.5

    bad = _rewrite(tmp_path / "new.safetensors", tmp_path / "bad.safetensors", edit_meta=bad_scale)
    with pytest.raises(ValueError, match="neither alpha / r nor alpha / sqrt"):
        load_adapter(copy.deepcopy(base), bad)


# ------------------------------------------------------------------------------ all or nothing


def _snapshot(model):
    """Everything load_adapter may change: module types, parameters, settings of fused layers."""
    settings = ("merged", "alpha", "scale", "dropout", "use_rslora", "eps", "d_initial", "variant", "fan_in_fan_out", "training")
    return {
        "modules": {name: type(m) for name, m in model.named_modules()},
        "params": {
            name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters(remove_duplicate=False)
        },
        "layers": {
            name: (
                {attr: getattr(layer, attr) for attr in settings if hasattr(layer, attr)},
                type(getattr(layer, "lora_dropout", None)),
                id(getattr(layer, "projections", None)),
            )
            for name, layer in adapter_layers(model)
        },
    }


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["layers"] == before["layers"]
    assert after["params"].keys() == before["params"].keys()
    for name, (value, requires_grad) in before["params"].items():
        now, now_requires_grad = after["params"][name]
        assert torch.equal(now, value) and now_requires_grad == requires_grad, name


_LAST = "model.layers.1.mlp.down_proj"  # the last layer of the file, a LoRA layer to inject
_REUSED = "model.layers.1.mlp.up_proj"  # a LoRA layer the target already holds


def _break(mode):
    """(edit_meta, edit_tensors, error type, message pattern) of one way a file can not fit."""

    def meta_edit(fn):
        return fn, None

    def tensor_edit(fn):
        return None, fn

    if mode == "wrong_shape_last_layer":
        edits = tensor_edit(lambda t: t.__setitem__(f"{_LAST}.lora_B", torch.zeros(30, 3)))
        return (*edits, ValueError, r"down_proj\.lora_B.*\(30, 2\).*\(30, 3\)")
    if mode == "missing_module":
        edits = meta_edit(lambda m: m["layers"].__setitem__("model.layers.1.mlp.nope", m["layers"][_LAST]))
        return (*edits, ValueError, "nope.*does not have")
    if mode == "tensor_model_lacks":
        edits = tensor_edit(lambda t: t.__setitem__("model.extra.weight", torch.zeros(3)))
        return (*edits, ValueError, r"lacks.*model\.extra\.weight")
    if mode == "module_type":
        edits = meta_edit(lambda m: m["layers"].__setitem__("model.norm", m["layers"][_LAST]))
        return (*edits, TypeError, r"model\.norm.*LlamaRMSNorm")
    if mode == "adapter_type":
        edits = meta_edit(lambda m: m["layers"][_REUSED].update(adapter_type="deep_lora", kwargs={}))
        return (*edits, ValueError, r"up_proj.*lora adapter of rank 2.*deep_lora")
    if mode == "rank":
        edits = meta_edit(lambda m: m["layers"][_REUSED].update(r=3))
        return (*edits, ValueError, r"up_proj.*rank 2.*rank 3")
    if mode == "bad_setting":
        edits = meta_edit(lambda m: m["layers"][_LAST]["kwargs"].update(dropout=1.5))
        return (*edits, ValueError, r"down_proj.*dropout")
    if mode == "bad_scale":
        edits = meta_edit(lambda m: m["layers"][_LAST].update(scale="big"))
        return (*edits, ValueError, r"down_proj.*scale")
    if mode == "unknown_setting":
        edits = meta_edit(lambda m: m["layers"][_LAST]["kwargs"].update(rank_dropout=0.5))
        return (*edits, ValueError, r"down_proj.*rank_dropout")
    if mode == "missing_adapter_tensor":  # (also gone from the trainable list, which is checked too)
        edits = (lambda m: m["trainable"].remove(f"{_LAST}.lora_A"), lambda t: t.pop(f"{_LAST}.lora_A"))
        return (*edits, ValueError, r"down_proj.*no tensor.*lora_A")
    if mode == "trainable_without_tensor":
        edits = meta_edit(lambda m: m["trainable"].append("model.layers.1.mlp.gate_proj.weight"))
        return (*edits, ValueError, r"trainable.*gate_proj\.weight")
    if mode == "inside_fused_layer":  # the target's q_proj is a fused VeRA layer
        inner = "model.layers.1.self_attn.q_proj.base_layer"
        edits = meta_edit(lambda m: m["layers"].__setitem__(inner, m["layers"][_LAST]))
        return (*edits, ValueError, r"q_proj\.base_layer.*inside the fused layer")
    if mode == "merged_layer_not_finite":  # model.layers.0.self_attn.v_proj was saved merged
        key = "model.layers.0.self_attn.v_proj.lora_B"
        edits = tensor_edit(lambda t: t[key].fill_(float("nan")))
        return (*edits, ValueError, r"v_proj.*merged.*NaN")
    if mode == "projections_too_small":
        edits = meta_edit(lambda m: m["projections"][0].update(max_in=10))
        return (*edits, ValueError, r"q_proj.*smaller")
    if mode == "projections_not_stored":
        edits = meta_edit(lambda m: m["projections"][0].update(stored=True))
        return (*edits, ValueError, r"projections entry 0.*no tensor")
    raise AssertionError(mode)


_FAILURES = [
    "wrong_shape_last_layer", "missing_module", "tensor_model_lacks", "module_type", "adapter_type", "rank",
    "bad_setting", "bad_scale", "unknown_setting", "missing_adapter_tensor", "trainable_without_tensor",
    "inside_fused_layer", "merged_layer_not_finite", "projections_too_small", "projections_not_stored",
]


@pytest.fixture(scope="module")
def _atomic_setup(tmp_path_factory):
    """A saved file (VeRA on q_proj, LoRA on v/up/down_proj, a head, a merged layer) and a target
    that holds some of those fused layers already (one merged) and plain layers elsewhere."""
    gen = torch.Generator().manual_seed(7)
    path = tmp_path_factory.mktemp("atomic") / "a.safetensors"
    base = tiny_llama()
    model = inject(copy.deepcopy(base), VeRAConfig(r=4, target_modules=["q_proj"]))
    inject(model, LoRAConfig(r=2, lora_alpha=4.0, target_modules=["v_proj", "up_proj", "down_proj"]))
    model.lm_head.weight.requires_grad_(True)
    _randomize(model, gen)
    adapter_layers(model)[1][1].merge()
    save_adapter(model, path)
    return base, path


@pytest.mark.parametrize("mode", _FAILURES)
def test_failed_load_changes_nothing(tmp_path, _atomic_setup, mode):
    base, path = _atomic_setup
    target = inject(copy.deepcopy(base), VeRAConfig(r=4, target_modules=["q_proj"]))
    inject(target, LoRAConfig(r=2, lora_alpha=8.0, lora_dropout=0.1, target_modules=["up_proj"]))
    adapter_layers(target)[2][1].merge()  # model.layers.0.mlp.up_proj: would be unmerged first
    edit_meta, edit_tensors, error, pattern = _break(mode)
    broken = _rewrite(path, tmp_path / "broken.safetensors", edit_meta, edit_tensors)
    before = _snapshot(target)
    with pytest.raises(error, match=pattern):
        load_adapter(target, broken)
    _assert_unchanged(target, before)
    # the unbroken file still loads into the same model afterwards
    load_adapter(target, path)
    assert len(adapter_layers(target)) == 8


def test_merged_lorma_that_cannot_unmerge_refused_before_any_change(tmp_path, gen):
    import pefttriton.adapters.lorma

    base = tiny_llama()
    model = inject(copy.deepcopy(base), LoRMAConfig(r=2, variant="naive", target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a.safetensors")
    target = inject(copy.deepcopy(base), LoRMAConfig(r=2, variant="naive", target_modules=["q_proj"]))
    for _, layer in adapter_layers(target):
        layer.merge()
    last = adapter_layers(target)[-1][1]
    last.base_weight_copy = None  # e.g. a merged model restored from a state_dict (the copy is not saved)
    assert isinstance(last, pefttriton.adapters.lorma.FusedLoRMALinear)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj.*cannot be unmerged"):
        load_adapter(target, tmp_path / "a.safetensors")
    _assert_unchanged(target, before)


# ------------------------------------------------------------------------------ tied weights


def test_tied_lm_head_saved_merged(tmp_path, gen):
    """A LoRA on GPT-2's lm_head (tied to wte), saved merged: loading records the tie, merging
    unties it, so wte keeps the base values; outputs match the saved model."""
    base = tiny_gpt2()
    with pytest.warns(UserWarning, match="tied"):
        model = inject(copy.deepcopy(base), LoRAConfig(r=2, target_modules=["lm_head", "c_attn"]))
    _randomize(model, gen)
    with pytest.warns(UserWarning, match="tied"):
        model.lm_head.merge()
    save_adapter(model, tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match="tied"):
        loaded = load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors")
    assert loaded.lm_head.merged and loaded.lm_head.tied_weight_names == []
    assert loaded.lm_head.base_layer.weight is not loaded.transformer.wte.weight
    assert torch.equal(loaded.transformer.wte.weight, base.transformer.wte.weight)
    assert not loaded.lm_head.fan_in_fan_out and loaded.transformer.h[0].attn.c_attn.fan_in_fan_out
    _assert_bit_identical(loaded, model, token_ids(gen))


def test_modules_to_save_record_round_trips(tmp_path, gen):
    """A head trained beside the adapters is saved, loaded and recorded again, so that a later
    PEFT export (or inject) still treats it as a module to save."""
    from pefttriton.integration.surgery import modules_to_save

    from collections import OrderedDict

    def build():
        torch.manual_seed(0)
        return nn.Sequential(OrderedDict(body=nn.Linear(8, 8), head=nn.Sequential(nn.Linear(8, 3))))

    model = inject(build(), LoRAConfig(r=2, target_modules=["body"], modules_to_save=["head"]))
    with torch.no_grad():
        model.head[0].weight.add_(torch.randn(3, 8, generator=gen))
        model.body.lora_B.add_(torch.randn(8, 2, generator=gen))
    path = tmp_path / "a.safetensors"
    save_adapter(model, path)
    fresh = load_adapter(build(), path)
    assert modules_to_save(fresh) == ["head"]
    assert fresh.head[0].weight.requires_grad and torch.equal(fresh.head[0].weight, model.head[0].weight)
    x = torch.randn(4, 8, generator=gen)
    assert torch.equal(fresh(x), model(x))
