"""The contract every registered adapter keeps, checked once for all of them.

The tests are parametrized over ``pefttriton.adapters.registry.adapters()`` (LoRMA once per variant, since
each variant initialises, computes and merges differently) plus a toy fifth adapter defined below
in a few lines. The toy is registered for this module only (see :func:`_toy_registered`): that
it passes the whole suite, and gets :func:`pefttriton.inject`, :func:`pefttriton.merge_and_unload`
and :func:`pefttriton.save_adapter` / :func:`pefttriton.load_adapter` without any code of its own,
is the proof that the registry is the one place that knows which adapters exist.

Expectations come from outside the code under test: the parameter names and shapes and the update
``delta W`` of each adapter are written out below from its definition (:data:`SPECS`), the merged
weight is compared with the weight the unmerged layer applies (its forward on the identity), the
settings with the values passed to the constructor, a loaded model with the saved one bit for bit.
An adapter registered without an entry in :data:`SPECS` still gets every generic check.
"""

import copy
import dataclasses
import inspect
import math
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from helpers import randomize_adapters, rel_err
from safetensors import safe_open
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from transformers.pytorch_utils import Conv1D

import pefttriton
from pefttriton.adapters import registry
from pefttriton.adapters.adapter_layer import AdapterLayer, LowRank
from pefttriton.adapters.config import AdapterConfig
from pefttriton.integration.surgery import adapter_layers

N_IN, N_OUT, R = 11, 9, 3  # odd sizes, multiples of no block size
BAD_RANKS = (0, -1, -2, -3, 1.5, 2.0, 2.5, True)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


# ------------------------------------------------------------------------------ the toy adapter


class ToyLinear(AdapterLayer):
    """``W0 + gain * diag(toy_b) 1 toy_A``: ``toy_A`` (r, in) random, ``toy_b`` (out,) zero, the
    up projection all ones; ``gain`` a setting."""

    adapter_type = "toy"
    adapter_layer_names = ("toy_A", "toy_b")
    settings = ("gain",)

    def __init__(self, base_layer: nn.Linear, r: int, *, gain: float = 1.0, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, r, fan_in_fan_out=fan_in_fan_out)
        self.gain = float(gain)
        kw = self._new_param_kwargs()
        self.toy_A = nn.Parameter(torch.randn(r, self.in_features, **kw) / math.sqrt(max(self.in_features, 1)))
        self.toy_b = nn.Parameter(torch.zeros(self.out_features, **kw))

    def engine_inputs(self, dtype: torch.dtype) -> LowRank:
        ones = torch.ones(self.out_features, self.r, dtype=dtype, device=self.toy_A.device)
        return LowRank(self.toy_A.to(dtype), ones, b=self.toy_b, scale=self.gain)


@dataclasses.dataclass
class ToyConfig(AdapterConfig):
    gain: float = 1.0

    layer_class = ToyLinear
    layer_settings = {"gain": "gain"}


@pytest.fixture(scope="module", autouse=True)
def _toy_registered():
    """The toy is an adapter while this module runs, and only then."""
    assert "toy" not in registry.adapters()
    pefttriton.register_adapter(ToyConfig, ToyLinear)
    yield
    registry.unregister_adapter("toy")
    assert "toy" not in registry.adapters()


# ------------------------------------------------------------------------------ expectations


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _shift_rows(P: torch.Tensor) -> torch.Tensor:
    """LoRMA-pi's shift: row i of P rolled right by i."""
    return torch.stack([torch.roll(P[i], i) for i in range(P.shape[0])])


def _vera_delta(layer, kw):
    A = _f64(layer.projections.vera_A[: layer.r, : layer.in_features])  # the slices VeRA documents
    B = _f64(layer.projections.vera_B[: layer.out_features, : layer.r])
    return (_f64(layer.lambda_b)[:, None] * B) @ (_f64(layer.lambda_d)[:, None] * A)


def _lora_delta(layer, kw):
    scale = kw["alpha"] / (math.sqrt(layer.r) if kw["use_rslora"] else layer.r)
    return scale * _f64(layer.lora_B) @ _f64(layer.lora_A)


def _deep_lora_delta(layer, kw):
    return _f64(layer.W3) @ _f64(layer.W2) @ _f64(layer.W1)


def _lorma_delta(layer, kw):
    s = kw["alpha"] / layer.r
    A, B = _f64(layer.lorma_A), _f64(layer.lorma_B)
    eye = torch.eye(layer.out_features, dtype=torch.float64)
    T = {"plus": eye + s * B @ A, "pi": s * _shift_rows(B @ A), "naive": s * B @ A}[kw["variant"]]
    return (T - eye) @ _f64(layer.base_layer.weight)  # called while unmerged: the base weight is W0


def _toy_delta(layer, kw):
    ones = torch.ones(layer.out_features, layer.r, dtype=torch.float64)
    return kw["gain"] * _f64(layer.toy_b)[:, None] * (ones @ _f64(layer.toy_A))


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one adapter (with one set of constructor arguments) promises.

    kwargs: constructor arguments beyond ``r``, every setting at a non-default value.
    init: ``"zero"`` (the update is exactly zero at init), ``"identity"`` (the layer starts at its
        base layer up to rounding; LoRMA pi, and the default for an adapter not listed here),
        ``"near"`` (within ``||delta W||_2 <= init_bound``: Deep LoRA's ``eps^3``), or None (no
        such promise: LoRMA naive starts at ``P_B W0``, see test_lorma.py).
    params: ``(n, m, r) -> {name: shape}`` of the adapter's own parameters.
    delta: ``(layer, kwargs) -> delta W`` in float64, from the adapter's definition.
    repr_parts: what ``repr`` shows of the settings.
    """

    adapter: str
    kwargs: dict
    init: str | None
    params: Callable | None = None
    delta: Callable | None = None
    repr_parts: tuple = ()
    init_bound: float = 0.0
    id: str = ""

    @property
    def name(self) -> str:
        return self.id or self.adapter


SPECS = {
    "vera": [
        Spec("vera", {"d_initial": 0.25}, "zero", lambda n, m, r: {"lambda_d": (r,), "lambda_b": (m,)},
             _vera_delta, ("d_initial=0.25",)),
    ],
    "lora": [
        Spec("lora", {"alpha": 5.0, "dropout": 0.1, "use_rslora": True}, "zero",
             lambda n, m, r: {"lora_A": (r, n), "lora_B": (m, r)}, _lora_delta,
             ("alpha=5", "dropout=0.1", "use_rslora=True")),
    ],
    "deep_lora": [
        Spec("deep_lora", {"eps": 0.05}, "near", lambda n, m, r: {"W1": (r, n), "W2": (r, r), "W3": (m, r)},
             _deep_lora_delta, ("eps=0.05",), init_bound=0.05**3),
    ],
    "lorma": [
        Spec("lorma", {"alpha": 6.0, "variant": variant}, init,
             lambda n, m, r: {"lorma_A": (r, m), "lorma_B": (m, r)}, _lorma_delta,
             ("alpha=6", f"variant='{variant}'"), id=f"lorma-{variant}")
        for variant, init in (("plus", "zero"), ("pi", "identity"), ("naive", None))
    ],
}
TOY = Spec("toy", {"gain": 1.5}, "zero", lambda n, m, r: {"toy_A": (r, n), "toy_b": (m,)}, _toy_delta, ("gain=1.5",))

# Collected at import, before the toy is registered: every adapter of the registry, then the toy.
CASES = [spec for name in registry.adapters() for spec in SPECS.get(name, [Spec(name, {}, "identity")])] + [TOY]


def cases(*, where=lambda spec: True):
    """``CASES`` (those ``where`` accepts) as pytest params with readable ids."""
    return [pytest.param(spec, id=spec.name) for spec in CASES if where(spec)]


def layer_class(spec: Spec) -> type[AdapterLayer]:
    return registry.get_adapter(spec.adapter).layer_class


def base_linear(dtype=torch.float32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(N_IN, N_OUT).to(dtype)


def make(spec: Spec, base: nn.Linear | None = None) -> AdapterLayer:
    torch.manual_seed(1)
    return layer_class(spec)(base if base is not None else base_linear(), R, **spec.kwargs)


def expected_settings(spec: Spec) -> dict:
    return {k: v for k, v in spec.kwargs.items() if k in layer_class(spec).settings}


def effective_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight an affine layer applies, read off its forward: ``f(I) - f(0)``, transposed."""
    with torch.no_grad():
        eye = torch.eye(layer.in_features, dtype=dtype)
        return (layer(eye) - layer(torch.zeros(1, layer.in_features, dtype=dtype))).T


def config_for(spec: Spec, targets: list[str], settings: dict | None = None) -> AdapterConfig:
    """The registered config of ``spec``'s adapter holding ``settings`` (default: the spec's)."""
    config_class = registry.get_adapter(spec.adapter).config_class
    settings = expected_settings(spec) if settings is None else settings
    fields = {field: settings[s] for field, s in config_class.layer_settings.items() if s in settings}
    return config_class(r=R, target_modules=targets, **fields)


def small_model() -> nn.Module:
    """An nn.Linear and a GPT-2 Conv1D to adapt, a plain head that stays as it is."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        lin=nn.Linear(N_IN, N_OUT), act=nn.Tanh(), conv=Conv1D(7, N_OUT), head=nn.Linear(7, 5),
    ))


# ------------------------------------------------------------------------------ the registry


def test_registry_holds_the_builtin_adapters_and_the_toy():
    names = list(registry.adapters())
    assert names[:4] == ["vera", "lora", "deep_lora", "lorma"] and names[-1] == "toy"
    assert {spec.adapter for spec in CASES} == set(names)  # every registered adapter is under contract
    entry = registry.get_adapter("toy")
    assert entry.config_class is ToyConfig and entry.layer_class is ToyLinear
    assert registry.adapter_of(make(TOY)) == entry
    config = ToyConfig(r=2, target_modules=["lin"], gain=0.5)
    assert config.adapter_type == "toy" and config.layer_kwargs() == {"gain": 0.5}
    assert registry.config_from_dict(config.to_dict()) == config
    assert pefttriton.register_adapter(ToyConfig, ToyLinear) == entry  # the same pair again: no change

    class OtherToy(ToyLinear):
        pass

    @dataclasses.dataclass
    class OtherConfig(AdapterConfig):
        layer_class = OtherToy

    with pytest.raises(ValueError, match="already registered"):
        pefttriton.register_adapter(OtherConfig, OtherToy)
    with pytest.raises(TypeError, match="layer_class"):
        pefttriton.register_adapter(ToyConfig, OtherToy)
    assert registry.get_adapter("toy") == entry


@pytest.mark.parametrize("spec", cases())
def test_config_names_every_setting(spec):
    """The config sets exactly the layer's settings, with the constructor's defaults."""
    entry = registry.get_adapter(spec.adapter)
    config_class, cls = entry.config_class, entry.layer_class
    assert sorted(config_class.layer_settings.values()) == sorted(cls.settings)
    assert set(cls.fixed_settings) <= set(cls.settings)
    signature = inspect.signature(cls.__init__).parameters
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    for field, setting in config_class.layer_settings.items():
        assert defaults[field] == signature[setting].default, field
    assert config_for(spec, ["lin"]).layer_kwargs() == expected_settings(spec)


# ------------------------------------------------------------------------------ construction


@pytest.mark.parametrize("spec", cases())
def test_rejects_non_linear_base_layer(spec):
    for bad in (nn.Conv1d(4, 4, 1), Conv1D(4, 4), nn.Identity()):
        with pytest.raises(TypeError, match="base_layer must be a torch.nn.Linear"):
            layer_class(spec)(bad, R, **spec.kwargs)


@pytest.mark.parametrize("spec", cases())
def test_rejects_bad_rank(spec):
    for r in BAD_RANKS:
        with pytest.raises(ValueError, match="r must be a positive int"):
            layer_class(spec)(nn.Linear(N_IN, N_OUT), r, **spec.kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("spec", cases(where=lambda spec: spec.init is not None))
def test_fresh_layer_outputs_the_base_layer(backend, gen, spec, dtype):
    base = base_linear(dtype)
    layer = make(spec, copy.deepcopy(base)).eval()
    x = torch.randn(3, 5, N_IN, generator=gen, dtype=dtype)
    with torch.no_grad():
        y, y_base = layer(x), base(x)
    if spec.init == "near":  # ||x delta^T|| <= ||delta||_2 ||x|| row by row, plus rounding
        slack = spec.init_bound * x.norm(dim=-1) + TOL[dtype] * y_base.abs().max()
        assert ((y - y_base).norm(dim=-1) <= slack).all()
        return
    if spec.init == "zero":
        assert torch.count_nonzero(layer.delta_weight()) == 0
        if backend == "torch":  # an exactly zero update adds exact zeros to the same base GEMM
            assert torch.equal(y, y_base)
    # the Triton GEMM sums in another order than the CPU BLAS: rounding differences only (and
    # LoRMA pi's s shift(B A) is the identity up to rounding)
    tol = 1e-6 if dtype == torch.float32 else (1e-14 if spec.init == "zero" else 1e-13)
    assert rel_err(y, y_base) < tol


@pytest.mark.parametrize("spec", cases())
def test_parameters_are_the_adapter_layer_names(gen, spec):
    layer = make(spec)
    cls = type(layer)
    params = layer.adapter_parameters()
    assert list(params) == list(cls.adapter_layer_names)
    if spec.params is not None:
        assert {k: tuple(p.shape) for k, p in params.items()} == spec.params(N_IN, N_OUT, R)
    for name, p in params.items():
        assert p is getattr(layer, name) and p.requires_grad and p.dtype == torch.float32
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == set(cls.adapter_layer_names)
    frozen = {"base_layer.weight", "base_layer.bias"}
    assert {name for name, _ in layer.named_parameters()} == trainable | frozen
    assert set(layer.state_dict()) == trainable | frozen  # checkpoints: the adapter and the base layer
    # float32 parameters beside a 16-bit base layer, float64 beside a float64 one
    for dtype, param_dtype in ((torch.float16, torch.float32), (torch.float64, torch.float64)):
        assert {p.dtype for p in make(spec, base_linear(dtype)).adapter_parameters().values()} == {param_dtype}
    # gradients reach every adapter parameter and never the base layer
    randomize_adapters(layer, gen)
    layer(torch.randn(4, N_IN, generator=gen)).sum().backward()
    assert all(p.grad is not None for p in params.values())
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


@pytest.mark.parametrize("spec", cases())
def test_settings_round_trip_through_the_constructor(gen, spec):
    layer = make(spec).eval()
    settings = layer.get_settings()
    assert list(settings) == list(type(layer).settings)
    if spec.adapter in SPECS or spec is TOY:
        assert settings == spec.kwargs  # every setting, at the value passed in
    rebuilt = layer_class(spec)(copy.deepcopy(layer.base_layer), R, **settings).eval()
    assert rebuilt.get_settings() == settings
    randomize_adapters(layer, gen)
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(4, N_IN, generator=gen)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), layer(x))  # the same settings: the same layer


@pytest.mark.parametrize("spec", cases())
def test_extra_repr(spec):
    layer = make(spec)
    parts = spec.repr_parts or tuple(f"{name}=" for name in type(layer).settings)
    text = layer.extra_repr()
    for part in (f"in_features={N_IN}", f"out_features={N_OUT}", f"r={R}", *parts, "merged=False"):
        assert part in text, (part, text)
    assert text in repr(layer)
    layer.merge()
    assert "merged=True" in repr(layer)


# Two forwards bypass the engine and its input check: LoRMA naive (two F.linear calls) and LoRA
# with dropout in training (the unfused composition). A wrong last dimension then gets torch's
# RuntimeError ("mat1 and mat2 shapes cannot be multiplied"), not the ValueError naming x that
# every other forward raises. A package issue (pefttriton/adapters/lorma.py, pefttriton/adapters/lora.py), reported;
# strict, so that the fix turns these into failures until the marks are removed.
@pytest.mark.parametrize("spec, mode", [
    pytest.param(spec, mode, id=f"{spec.name}-{mode}") for spec in CASES for mode in ("eval", "train")
])
def test_forward_rejects_wrong_last_dim(backend, gen, spec, mode):
    layer = make(spec).train(mode == "train")
    with pytest.raises(ValueError, match=rf"x must have shape \(\.\.\., {N_IN}\)"):
        layer(torch.randn(3, N_IN - 1, generator=gen))


# ------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("spec", cases())
def test_merge_equals_unmerged_forward_and_unmerge_restores(backend, gen, spec, dtype):
    layer = make(spec, base_linear(dtype)).eval()
    randomize_adapters(layer, gen, scale=0.3)
    tol = TOL[dtype]
    weight = layer.base_layer.weight
    W0 = weight.detach().clone()
    x = torch.randn(4, 5, N_IN, generator=gen, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        applied = effective_weight(layer, dtype)  # what the unmerged layer computes
        delta = layer.delta_weight()
        if spec.delta is not None:
            assert rel_err(applied - W0, spec.delta(layer, spec.kwargs)) < tol
        assert rel_err(delta, applied - W0) < tol
        layer.merge()
        assert layer.merged
        assert rel_err(weight, applied) < tol
        assert rel_err(layer(x), y) < tol
        assert rel_err(layer.delta_weight(), delta) < tol  # still relative to W0 while merged
        merged = weight.detach().clone()
        with pytest.warns(UserWarning, match="already merged"):
            layer.merge()
        assert torch.equal(weight, merged)
        layer.unmerge()
        assert not layer.merged
        assert rel_err(weight, W0) < tol
        torch.testing.assert_close(weight, W0, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-13)
        with pytest.warns(UserWarning, match="not merged"):
            layer.unmerge()
        assert rel_err(layer(x), y) < tol


@pytest.mark.parametrize("spec", cases())
def test_safe_merge_refuses_nan_and_leaves_the_weight(spec):
    layer = make(spec)
    with torch.no_grad():
        next(iter(layer.adapter_parameters().values())).view(-1)[0] = float("nan")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged
    layer.merge()  # without safe_merge it merges, as PEFT does
    assert layer.merged and not torch.isfinite(layer.base_layer.weight).all()


@pytest.mark.parametrize("spec", cases())
def test_safe_merge_passes_finite_adapters(gen, spec):
    layer = make(spec).eval()
    x = torch.randn(3, N_IN, generator=gen)
    with torch.no_grad():
        expected = layer(x)
        layer.merge(safe_merge=True)
        assert layer.merged
        assert rel_err(layer(x), expected) < 1e-5


# ------------------------------------------------------------------------------ models


@pytest.mark.parametrize("spec", cases())
def test_inject_and_merge_and_unload(gen, spec):
    base = small_model()
    model = pefttriton.inject(copy.deepcopy(base), config_for(spec, ["lin", "conv"])).eval()
    cls = layer_class(spec)
    assert type(model.lin) is cls and type(model.conv) is cls and type(model.head) is nn.Linear
    assert not model.lin.fan_in_fan_out and model.conv.fan_in_fan_out
    assert model.lin.get_settings() == model.conv.get_settings() == expected_settings(spec)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{layer}.{p}" for layer in ("lin", "conv") for p in cls.adapter_layer_names}
    randomize_adapters(model, gen, scale=0.3)
    model.lin.merge()  # an already merged layer is taken as it is
    x = torch.randn(4, N_IN, generator=gen)
    with torch.no_grad():
        y = model(x)
        applied = {name: effective_weight(getattr(model, name), torch.float32) for name in ("lin", "conv")}
        expected = {
            "lin": base.lin.weight.double() + _f64(model.lin.delta_weight()),
            "conv": base.conv.weight.T.double() + _f64(model.conv.delta_weight()),
        }
        out = pefttriton.merge_and_unload(model)
    assert out is model and not adapter_layers(model)
    assert type(model.lin) is nn.Linear and type(model.conv) is Conv1D
    merged = {"lin": model.lin.weight, "conv": model.conv.weight.T}
    for name in ("lin", "conv"):
        assert rel_err(merged[name], expected[name]) < 1e-6, name
        assert rel_err(merged[name], applied[name]) < 1e-5, name
    with torch.no_grad():
        assert rel_err(model(x), y) < 1e-5


def _file_keys(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("into", ["plain", "fused"])
@pytest.mark.parametrize("spec", cases())
def test_save_load_round_trip_is_bit_exact(tmp_path, gen, spec, into):
    """Into a fresh plain model, or onto fused layers of the same type and rank holding other
    values and default settings; one layer saved merged comes back merged."""
    base = small_model()
    model = pefttriton.inject(copy.deepcopy(base), config_for(spec, ["lin", "conv"])).eval()
    randomize_adapters(model, gen)
    model.lin.merge()
    path = tmp_path / "adapter.safetensors"
    pefttriton.save_adapter(model, path)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert _file_keys(path) == trainable  # no frozen weight, no projection
    if into == "plain":
        target = copy.deepcopy(base)
    else:  # fixed settings must agree; the others take the constructor's defaults
        fixed = {k: v for k, v in expected_settings(spec).items() if k in layer_class(spec).fixed_settings}
        target = pefttriton.inject(copy.deepcopy(base), config_for(spec, ["lin", "conv"], fixed)).eval()
    loaded = pefttriton.load_adapter(target, path).eval()
    assert loaded is target
    params, loaded_params = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert sorted(params) == sorted(loaded_params)
    for name, p in params.items():
        q = loaded_params[name]
        assert q.dtype == p.dtype and torch.equal(q, p) and q.requires_grad == p.requires_grad, name
    for (name, layer), (name2, layer2) in zip(adapter_layers(model), adapter_layers(loaded), strict=True):
        assert name == name2 and type(layer2) is layer_class(spec)
        assert (layer2.merged, layer2.fan_in_fan_out) == (layer.merged, layer.fan_in_fan_out)
        assert layer2.get_settings() == expected_settings(spec)
        assert layer2.engine_inputs(torch.float32).scale == layer.engine_inputs(torch.float32).scale
    assert (model.lin.merged, model.conv.merged) == (True, False)
    x = torch.randn(4, N_IN, generator=gen)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ------------------------------------------------------------------------------ torch.compile


@pytest.fixture
def fresh_dynamo():
    """Each compile starts from scratch: the adapter layers share one ``forward`` code object, and
    Dynamo's per-code-object recompile limit would otherwise count every earlier test's layers."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("spec", cases())
def test_compile_fullgraph_equals_eager(backend, gen, spec, fresh_dynamo):
    """``fullgraph=True`` with aot_eager's compilers (``aot_autograd`` with the traced graphs run
    as they are), ``dynamic=True``: a module's float setting becomes symbolic (checking it with
    ``math.isfinite`` once broke the trace). Two token counts run through one graph."""
    layer = make(spec).eval()
    randomize_adapters(layer, gen, scale=0.3)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(
        layer, fullgraph=True, dynamic=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=lambda gm, _: gm.forward)
    )
    for tokens in (5, 8):
        x = torch.randn(tokens, N_IN, generator=gen)
        layer.zero_grad(set_to_none=True)
        y = compiled(x)
        y.sum().backward()
        grads = {name: p.grad.clone() for name, p in layer.adapter_parameters().items()}
        layer.zero_grad(set_to_none=True)
        y_eager = layer(x)
        y_eager.sum().backward()
        assert rel_err(y, y_eager) < 1e-6
        for name, p in layer.adapter_parameters().items():
            assert rel_err(grads[name], p.grad) < 1e-6, name
    assert len(graphs) == 1  # one forward graph for both token counts
