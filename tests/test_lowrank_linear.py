"""``pefttriton.lowrank_linear`` against the naive float64 reference, on both backends.

The "triton" backend runs the real Triton kernels through the CPU interpreter (see conftest.py).
Every comparison is against ``pefttriton.ops.naive.lowrank_linear_reference`` evaluated with
float64 copies of the very same inputs and differentiated by plain autograd.
"""

import importlib
import warnings

import pytest
import torch
from helpers import BACKENDS, DEVICE, rel_err

import pefttriton
from pefttriton import lowrank_linear
from pefttriton.kernels import lowrank_linear as kernels
from pefttriton.ops.naive import lowrank_linear_reference

NAMES = ("x", "weight", "bias", "A", "B", "d", "b")

# Relative error max|a - ref| / max|ref| allowed per dtype (outputs and gradients alike).
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    # bf16 under the interpreter: the kernels upcast bf16 tiles to fp32 before every tl.dot
    # (the interpreter's bf16 dot is broken, design.md section 4), so these tests cover loads,
    # masks, scaling, accumulation and bf16 stores, but NOT the bf16 tensor-core dot instruction
    # that compiled GPU kernels use.
    torch.bfloat16: 3e-2,
}

# Shapes (N, n, m) that are multiples of no block size. The second one has N > 64 (several row
# blocks in both kernels, so partial sums of grad_d / grad_b are reduced across blocks), n < 32
# and m > 64.
SHAPE_A = (37, 70, 45)
SHAPE_B = (131, 19, 83)


def make_inputs(gen, N, n, m, r, *, dtype=torch.float32, lead=None, bias=True, d=True, b=True,
                requires_grad=NAMES, vec_dtype=None):
    """Random inputs; ``lead`` replaces (N,) as the leading shape of x; None for absent ones."""
    vec_dtype = vec_dtype or dtype

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt)

    lead = (N,) if lead is None else tuple(lead)
    t = {
        "x": rnd(*lead, n),
        "weight": rnd(m, n) / n**0.5,
        "bias": rnd(m) if bias else None,
        "A": rnd(r, n) / n**0.5,
        "B": rnd(m, r),
        "d": rnd(r, dt=vec_dtype) if d else None,
        "b": rnd(m, dt=vec_dtype) if b else None,
    }
    for name in requires_grad:
        if t[name] is not None:
            t[name].requires_grad_(True)
    return t


def check_against_reference(t, scale, tol, gen):
    """Forward and every gradient of lowrank_linear vs the float64 reference."""
    args = [t[k] for k in NAMES]
    y = lowrank_linear(*args, scale=scale)
    x, weight = t["x"], t["weight"]
    assert y.dtype == x.dtype
    assert y.shape == (*x.shape[:-1], weight.shape[0])

    ref_args = [a.detach().double().requires_grad_(a.requires_grad) if a is not None else None for a in args]
    y_ref = lowrank_linear_reference(*ref_args, scale=scale)
    err = rel_err(y, y_ref)
    assert err < tol, f"output: relative error {err:.2e} >= {tol:.0e}"

    wrt = [k for k in NAMES if t[k] is not None and t[k].requires_grad]
    if not wrt:
        return
    grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, [t[k] for k in wrt], grad_out)
    ref_grads = torch.autograd.grad(y_ref, [ref_args[NAMES.index(k)] for k in wrt], grad_out.double())
    for name, g, g_ref in zip(wrt, grads, ref_grads):
        assert g.dtype == t[name].dtype, name
        err = rel_err(g, g_ref)
        assert err < tol, f"grad {name}: relative error {err:.2e} >= {tol:.0e}"


def count_launcher_calls(monkeypatch, *names):
    """Wrap the named Triton launchers so each call is counted; returns the live counts."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    return calls


# ----------------------------------------------------------------------- forward and backward


@pytest.mark.parametrize("shape", [SHAPE_A, SHAPE_B], ids=["37x70x45", "131x19x83"])
@pytest.mark.parametrize("r", [1, 7, 16, 33, 130])
def test_ranks_and_shapes(backend, gen, shape, r):
    """Every tensor requires grad (weight and bias included); r = 130 splits the rank across
    programs of the low-rank backward kernel (rank blocks of at most 64)."""
    t = make_inputs(gen, *shape, r, dtype=torch.float32)
    check_against_reference(t, scale=0.5, tol=TOL[torch.float32], gen=gen)


@pytest.fixture
def split_mode():
    """Run with strategy "split" (base GEMM by torch, low-rank path added by Triton)."""
    with pefttriton.use_strategy("split"):
        yield


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp64", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("r,vectors", [(1, True), (33, True), (7, False)], ids=["r1-vera", "r33-vera", "r7-lora"])
def test_split_gemm_mode_triton(gen, split_mode, dtype, r, vectors):
    """The split forward/backward (cuBLAS base GEMM + Triton low-rank add) against the reference."""
    t = make_inputs(gen, *SHAPE_B, r, dtype=dtype, lead=(3, 13) if vectors else None, d=vectors, b=vectors)
    with pefttriton.use_backend("triton"):
        check_against_reference(t, scale=0.7, tol=TOL[dtype], gen=gen)


def test_split_gemm_mode_launches_add_kernel(gen, monkeypatch, split_mode):
    """In split mode the Triton backend adds into y (and grad_x) instead of running the fused GEMM."""
    calls = count_launcher_calls(monkeypatch, "fused_gemm", "add_lowrank_", "lowrank_grads")
    t = make_inputs(gen, 9, 6, 5, 3, dtype=torch.float64, requires_grad=("x", "d", "b"))
    with pefttriton.use_backend("triton"):
        lowrank_linear(*[t[k] for k in NAMES]).sum().backward()
    # forward: down projection + low-rank add; backward: low-rank grads + low-rank add into g W
    assert calls == {"fused_gemm": 1, "add_lowrank_": 2, "lowrank_grads": 1}


def test_set_gemm_mode_is_a_deprecated_alias_of_set_strategy():
    with pytest.warns(DeprecationWarning, match="set_strategy"), pytest.raises(ValueError, match="gemm mode"):
        pefttriton.set_gemm_mode("cublas")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="gemm mode"):
        pefttriton.set_gemm_mode("lean")  # the old function keeps its old names
    assert pefttriton.get_strategy() == "auto"
    with pytest.warns(DeprecationWarning):
        pefttriton.set_gemm_mode("split")
    assert pefttriton.get_strategy() == pefttriton.get_gemm_mode() == "split"
    with pytest.raises(ValueError, match="strategy must be one of"):
        pefttriton.set_strategy("cublas")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("d,b", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["no-d-no-b", "d-only", "b-only", "d-and-b"])
def test_optional_terms(backend, gen, bias, d, b):
    """bias / d / b present or absent, 3-D input, scale != 1, float64 (tight tolerance)."""
    t = make_inputs(gen, *SHAPE_A, 7, dtype=torch.float64, lead=(3, 13), bias=bias, d=d, b=b)
    check_against_reference(t, scale=1.7, tol=TOL[torch.float64], gen=gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp64", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("lead", [None, (3, 13)], ids=["2d", "3d"])
def test_dtypes(backend, gen, dtype, lead):
    t = make_inputs(gen, *SHAPE_A, 33, dtype=dtype, lead=lead)
    check_against_reference(t, scale=0.25, tol=TOL[dtype], gen=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_frozen_projections_vera_style(backend, gen, dtype):
    """A, B, weight, bias frozen (VeRA); d and b in float32 as VeRA keeps them, x in ``dtype``."""
    t = make_inputs(gen, *SHAPE_B, 16, dtype=dtype, vec_dtype=torch.float32, requires_grad=("x", "d", "b"))
    check_against_reference(t, scale=1.0, tol=TOL[dtype], gen=gen)
    assert t["A"].grad is None and t["B"].grad is None and t["weight"].grad is None


def test_only_x_requires_grad(backend, gen):
    t = make_inputs(gen, *SHAPE_A, 7, dtype=torch.float64, lead=(3, 13), requires_grad=("x",))
    check_against_reference(t, scale=0.3, tol=TOL[torch.float64], gen=gen)


def test_lora_style_trainable_A_B(backend, gen):
    """LoRA: only A and B train, no d / b; also checks that B's gradient path works without b."""
    t = make_inputs(gen, *SHAPE_B, 7, dtype=torch.float32, d=False, b=False, requires_grad=("A", "B"))
    check_against_reference(t, scale=2.0, tol=TOL[torch.float32], gen=gen)


def test_non_contiguous_inputs(backend, gen):
    """Transposed views of x and weight (the kernels take any strides)."""
    N, n, m, r = SHAPE_A[0], SHAPE_A[1], SHAPE_A[2], 7
    t = make_inputs(gen, N, n, m, r, dtype=torch.float64)
    x_t = t["x"].detach().T.contiguous().T.requires_grad_(True)  # same values, strides (1, N)
    w_t = t["weight"].detach().T.contiguous().T.requires_grad_(True)
    assert not x_t.is_contiguous() and not w_t.is_contiguous()
    t["x"], t["weight"] = x_t, w_t
    check_against_reference(t, scale=0.5, tol=TOL[torch.float64], gen=gen)


def test_empty_input(backend, gen):
    """Zero tokens: an empty output, zero gradients for the parameters."""
    t = make_inputs(gen, 0, 20, 9, 3, dtype=torch.float64)
    check_against_reference(t, scale=0.5, tol=TOL[torch.float64], gen=gen)
    y = lowrank_linear(*[t[k] for k in NAMES], scale=0.5)
    assert y.shape == (0, 9)
    gd, gb = torch.autograd.grad(y.sum(), [t["d"], t["b"]])
    assert torch.equal(gd, torch.zeros_like(gd)) and torch.equal(gb, torch.zeros_like(gb))


@pytest.mark.interpreter
def test_backends_agree_with_each_other(gen):
    """Both backends, same inputs, float64: outputs and gradients agree to rounding."""
    t = make_inputs(gen, *SHAPE_B, 33, dtype=torch.float64)
    args = [t[k] for k in NAMES]
    results = {}
    for name in BACKENDS:
        with pefttriton.use_backend(name):
            y = lowrank_linear(*args, scale=0.7)
            results[name] = (y, *torch.autograd.grad(y, args, torch.ones_like(y)))
    for a, b in zip(results["torch"], results["triton"]):
        assert rel_err(a, b) < 1e-12


# --------------------------------------------------------------------------------- gradcheck


def _gradcheck_inputs():
    g = torch.Generator().manual_seed(7)
    N, n, m, r = 5, 6, 4, 3
    shapes = [(N, n), (m, n), (m,), (r, n), (m, r), (r,), (m,)]
    return [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]


def test_gradcheck_torch_backend():
    inputs = _gradcheck_inputs()
    with pefttriton.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda *a: lowrank_linear(*a, scale=0.7), inputs)


def test_gradcheck_triton_backend():
    """Full (slow-mode) gradcheck through the interpreter: ~4 s."""
    inputs = _gradcheck_inputs()
    with pefttriton.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda *a: lowrank_linear(*a, scale=0.7), inputs)


# ------------------------------------------------------------------------ saved for backward


def _saved_shapes(t):
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = lowrank_linear(*[t[k] for k in NAMES], scale=0.5)
    y.sum().backward()  # the saved tensors must suffice for backward
    return shapes


def test_saved_for_backward_vera_style(backend, gen):
    """VeRA (A, B, weight frozen): neither a (N, m) tensor nor x itself is kept for backward."""
    N, n, m, r = 64, 40, 48, 8  # no two dims coincide, N*n and N*m match no other size
    t = make_inputs(gen, N, n, m, r, requires_grad=("x", "d", "b"))
    shapes = _saved_shapes(t)
    assert shapes, "nothing saved at all: the hook did not see the op"
    assert (N, r) in shapes, shapes  # x A^T is what backward uses
    for shape in shapes:
        numel = torch.Size(shape).numel()
        assert shape != (N, m) and numel != N * m, f"a (tokens, out) tensor was saved: {shapes}"
        assert numel != N * n, f"x (or a copy of its size) was saved though A and weight are frozen: {shapes}"
    for k in ("x", "d", "b"):
        assert t[k].grad is not None


def test_saved_for_backward_keeps_x_when_A_trains(backend, gen):
    """Non-vacuity of the check above: with A trainable, x (N, n) must be saved."""
    N, n, m, r = 64, 40, 48, 8
    t = make_inputs(gen, N, n, m, r, requires_grad=("x", "A", "d", "b"))
    shapes = _saved_shapes(t)
    assert (N, n) in shapes, shapes
    assert all(s != (N, m) and torch.Size(s).numel() != N * m for s in shapes), shapes


# ------------------------------------------------------------------------------- validation


def _small(gen, dtype=torch.float32):
    return make_inputs(gen, 4, 6, 5, 3, dtype=dtype, requires_grad=())


def _call(t, **overrides):
    t = {**t, **overrides}
    return lowrank_linear(*[t[k] for k in NAMES], scale=overrides.get("scale", 1.0))


def test_wrong_last_dim_of_x(gen):
    t = _small(gen)
    with pytest.raises(ValueError, match=r"^x must have shape \(\.\.\., 6\)"):
        _call(t, x=torch.randn(4, 7))


@pytest.mark.parametrize("name", ["weight", "bias", "A", "B"])
def test_mismatched_dtype(gen, name):
    t = _small(gen)
    with pytest.raises(TypeError, match=rf"^{name} must have dtype"):
        _call(t, **{name: t[name].double()})


@pytest.mark.parametrize("name", ["d", "b"])
def test_vector_dtype_fp32_allowed_others_not(gen, name):
    """d and b may be float32 next to 16-bit x (checked numerically elsewhere), not float64."""
    t = _small(gen, dtype=torch.float16)
    _call(t, **{name: t[name].float()})  # accepted
    with pytest.raises(TypeError, match=rf"^{name} must have dtype"):
        _call(t, **{name: t[name].double()})


@pytest.mark.parametrize("name", ["weight", "bias", "A", "B", "d", "b"])
def test_mismatched_device(gen, name):
    t = _small(gen)
    with pytest.raises(ValueError, match=rf"^{name} is on meta but x is on cpu"):
        _call(t, **{name: t[name].to("meta")})


def test_rank_zero(gen):
    t = _small(gen)
    with pytest.raises(ValueError, match="rank"):
        _call(t, A=torch.randn(0, 6), B=torch.randn(5, 0), d=None)


@pytest.mark.parametrize(
    "name,shape", [("B", (5, 4)), ("B", (4, 3)), ("bias", (4,)), ("d", (4,)), ("b", (6,))]
)
def test_wrong_shape(gen, name, shape):
    t = _small(gen)
    with pytest.raises(ValueError, match=rf"^{name} must have shape"):
        _call(t, **{name: torch.randn(*shape)})


@pytest.mark.parametrize("name", ["x", "weight", "bias", "A", "B", "d", "b"])
def test_non_tensor_input(gen, name):
    t = _small(gen)
    with pytest.raises(TypeError, match=rf"^{name} must be a torch\.Tensor"):
        _call(t, **{name: t[name].tolist()})


def test_bad_x_dtype_and_scale(gen):
    t = _small(gen)
    with pytest.raises(TypeError, match="x must be"):
        _call(t, x=t["x"].long())
    with pytest.raises(ValueError, match="scale must be finite"):
        _call(t, scale=float("inf"))
    with pytest.raises(TypeError, match="scale must be a float"):
        _call(t, scale="0.5")


# --------------------------------------------------------------------------------- dispatch


def test_set_backend_rejects_unknown_name():
    before = pefttriton.get_backend()
    with pytest.raises(ValueError, match="bogus"):
        pefttriton.set_backend("bogus")
    assert pefttriton.get_backend() == before


def test_use_backend_restores_previous():
    pefttriton.set_backend("torch")
    with pefttriton.use_backend("triton"):
        assert pefttriton.get_backend() == "triton"
        with pefttriton.use_backend("auto"):
            assert pefttriton.get_backend() == "auto"
        assert pefttriton.get_backend() == "triton"
    assert pefttriton.get_backend() == "torch"
    with pytest.raises(RuntimeError, match="boom"):
        with pefttriton.use_backend("triton"):
            raise RuntimeError("boom")
    assert pefttriton.get_backend() == "torch"


@pytest.mark.cpu_only  # "auto" picks torch for CPU tensors
@pytest.mark.parametrize("name,expect_triton", [("triton", True), ("torch", False), ("auto", False)])
def test_backend_selects_implementation(gen, monkeypatch, name, expect_triton):
    """The chosen backend really runs: Triton launchers are called exactly under "triton"
    ("auto" means PyTorch on CPU tensors)."""
    calls = count_launcher_calls(monkeypatch, "fused_gemm", "lowrank_grads")
    t = make_inputs(gen, 9, 6, 5, 3, dtype=torch.float64, requires_grad=("x", "d", "b"))
    with pefttriton.use_backend(name):
        y = lowrank_linear(*[t[k] for k in NAMES])
        y.sum().backward()
    if expect_triton:
        # forward: down projection + fused GEMM; backward: low-rank grads + grad_x GEMM
        assert calls == {"fused_gemm": 3, "lowrank_grads": 1}
    else:
        assert calls == {"fused_gemm": 0, "lowrank_grads": 0}


@pytest.mark.cpu_only  # CPU tensors without the interpreter
def test_triton_backend_on_cpu_without_interpreter_errors(gen, monkeypatch):
    from pefttriton.kernels import launch

    monkeypatch.setattr(launch, "INTERPRET", False)
    t = _small(gen)
    with pefttriton.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            _call(t)


# ------------------------------------------------------------------------------- strategies

STRATEGY_BACKEND = {"lean": "torch", "weight": "torch", "fused": "triton", "split": "triton"}
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(params=list(STRATEGY_BACKEND))
def strategy(request):
    """Runs the test once per strategy, the Triton ones through the interpreter; yields its name."""
    with pefttriton.use_backend(STRATEGY_BACKEND[request.param]), pefttriton.use_strategy(request.param):
        yield request.param


# The weight strategy refuses 16-bit tensors (tested below).
STRATEGY_DTYPES = [(name, dtype) for name in STRATEGY_BACKEND for dtype in DTYPE_IDS
                   if not (name == "weight" and dtype in (torch.float16, torch.bfloat16))]


@pytest.mark.parametrize("name,dtype", STRATEGY_DTYPES, ids=[f"{n}-{DTYPE_IDS[d]}" for n, d in STRATEGY_DTYPES])
@pytest.mark.parametrize("r", [1, 33, 257])
@pytest.mark.parametrize("adapter", ["vera", "lora"])
def test_every_strategy_against_float64(gen, name, dtype, r, adapter):
    """Forward and every gradient of each strategy at an odd shape, r from 1 to above 256 (r = 257
    splits the rank over five blocks of the low-rank backward kernel)."""
    vera = adapter == "vera"
    grads = ("x", "d", "b", "bias") if vera else ("x", "A", "B", "weight")
    t = make_inputs(gen, *SHAPE_B, r, dtype=dtype, lead=(3, 13, 2) if vera else None, d=vera, b=vera,
                    requires_grad=grads)
    with pefttriton.use_backend(STRATEGY_BACKEND[name]), pefttriton.use_strategy(name):
        check_against_reference(t, scale=0.7 if vera else 2.0, tol=TOL[dtype], gen=gen)
        assert pefttriton.last_path() == name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_weight_strategy_on_16_bit_falls_back_with_a_warning(gen, dtype):
    """A strategy that cannot run (weight on 16 bits) runs what auto picks among those that can,
    warning once per (strategy, reason); auto never picks it."""
    from pefttriton.ops import backend

    backend._WARNED.clear()
    t = make_inputs(gen, 5, 6, 7, 2, dtype=dtype)
    with pefttriton.use_strategy("weight"):
        with pytest.warns(UserWarning, match=r"strategy 'weight' cannot run here: it needs float32 .* running 'lean'"):
            lowrank_linear(*[t[k] for k in NAMES])
        assert pefttriton.last_path() == "lean"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per (strategy, reason)
            lowrank_linear(*[t[k] for k in NAMES])
    with pefttriton.use_strategy("auto"):
        lowrank_linear(*[t[k] for k in NAMES])
        assert pefttriton.last_path() == "lean"


def test_triton_strategy_under_the_torch_backend_falls_back_with_a_warning(gen):
    from pefttriton.ops import backend

    backend._WARNED.clear()
    t = make_inputs(gen, 5, 6, 7, 2)
    with pefttriton.use_backend("torch"), pefttriton.use_strategy("fused"):
        with pytest.warns(UserWarning, match="strategy 'fused' cannot run here: the backend is 'torch'"):
            lowrank_linear(*[t[k] for k in NAMES])
        assert pefttriton.last_path() in ("lean", "weight")


def test_strategies_save_only_x_A_transposed(strategy, gen):
    """Every strategy keeps the save-little backward: x A^T, and x only when A trains."""
    N, n, m, r = 64, 40, 48, 8
    shapes = _saved_shapes(make_inputs(gen, N, n, m, r, requires_grad=("x", "d", "b")))
    assert (N, r) in shapes and all(torch.Size(s).numel() not in (N * m, N * n) for s in shapes), shapes
    shapes = _saved_shapes(make_inputs(gen, N, n, m, r, requires_grad=("x", "A", "B")))
    assert (N, n) in shapes and all(torch.Size(s).numel() != N * m for s in shapes), shapes


def adapter_effect_kept(strategy: str | None, dtype=torch.bfloat16) -> float:
    """beta = <y - y_without_adapter, x dW^T> / |x dW^T|^2 at N=512, 256x256, r=64, |dW|/|W| = 3e-4:
    1 when the adapter's effect survives rounding to ``dtype`` on average.

    ``strategy=None`` computes the double-rounded sum (base output rounded to ``dtype``, then the
    adapter added and rounded again), which the strategies must not do.
    """
    gen = torch.Generator().manual_seed(0)
    N, n, m, r = 512, 256, 256, 64
    x = torch.randn(N, n, generator=gen)
    W, A = torch.randn(m, n, generator=gen) / n**0.5, torch.randn(r, n, generator=gen) / n**0.5
    B, d, b = torch.randn(m, r, generator=gen) / r**0.5, torch.rand(r, generator=gen) + 0.5, torch.rand(m, generator=gen) + 0.5
    dW = (B * b[:, None]) @ (A * d[:, None])
    s = float(3e-4 * W.norm() / dW.norm())
    effect = x.double() @ (s * dW.double()).T
    xs, Ws, As, Bs = (t.to(dtype) for t in (x, W, A, B))
    y0 = xs @ Ws.T
    if strategy is None:
        y = y0 + (s * ((xs @ As.T) * d.to(dtype)) @ Bs.T * b.to(dtype)).to(dtype)
    else:
        with pefttriton.use_backend(STRATEGY_BACKEND[strategy]), pefttriton.use_strategy(strategy):
            y = lowrank_linear(xs, Ws, None, As, Bs, d, b, s)
    delta = y.double() - y0.double()
    return float((delta * effect).sum() / (effect * effect).sum())


@pytest.mark.parametrize("name", ["lean", "fused", "split", "auto"])
def test_16_bit_output_is_rounded_once(name):
    """A small adapter's effect survives bf16: every strategy adds base and adapter before rounding."""
    assert not 0.9 <= adapter_effect_kept(None) <= 1.1  # the check can fail: double rounding fails it
    if name == "auto":
        with pefttriton.use_backend("torch"):
            beta = adapter_effect_kept("lean")  # auto on the CPU
    else:
        beta = adapter_effect_kept(name)
    assert 0.9 <= beta <= 1.1, beta


def test_auto_follows_the_cost_model(monkeypatch):
    """auto takes the path the cost model rates cheapest among those the backend allows."""
    from pefttriton.ops import strategy as chooser

    cpu = torch.device("cpu")
    big = (4096, 1024, 1024, 256)
    assert chooser.choose(cpu, torch.float32, big, "vectors", ("lean", "weight")) == "weight"
    assert chooser.choose(cpu, torch.float32, (64, 1024, 1024, 256), "vectors", ("lean", "weight")) == "lean"
    assert chooser.choose(cpu, torch.bfloat16, big, "vectors", ("lean",)) == "lean"
    monkeypatch.setattr(chooser, "estimate", lambda path, *args: {"lean": 2.0, "weight": 3.0}[path])
    pefttriton.clear_strategy_cache()  # the cost model's choices are cached per shape
    assert chooser.choose(cpu, torch.float32, big, "vectors", ("lean", "weight")) == "lean"


def test_measured_autotune_times_once_per_bucket_and_keeps_the_fastest(gen, monkeypatch):
    # the op's module (pefttriton.ops.lowrank_linear is the function of that name)
    lowrank_linear_module = importlib.import_module("pefttriton.ops.lowrank_linear")

    timed = []
    fake = {"lean": 0.3, "weight": 0.1}

    def time_path(path, device, dtype, shape, trains, reps=3):
        timed.append((path, shape, trains))
        return fake[path]

    monkeypatch.setattr(lowrank_linear_module, "time_path", time_path)
    pefttriton.set_strategy_autotune(True)
    for N in (100, 120):  # one token bucket (128)
        t = make_inputs(gen, N, 6, 5, 3, requires_grad=("x", "d", "b"))
        lowrank_linear(*[t[k] for k in NAMES]).sum().backward()
        assert pefttriton.last_path() == "weight"
    assert sorted(p for p, *_ in timed) == ["lean", "weight"]  # timed once, for the first call
    assert list(pefttriton.strategy_cache().values()) == ["weight"]
    key = next(iter(pefttriton.strategy_cache()))
    assert key[3] == 128 and key[-2] == "vectors"


def test_measured_autotune_really_times(gen, monkeypatch):
    """Without stubs: the measurement runs each allowed path and caches the fastest it measured."""
    engine = importlib.import_module("pefttriton.ops.lowrank_linear")
    measured = {}
    real = engine.time_path

    def recording(path, *args, **kwargs):
        measured[path] = real(path, *args, **kwargs)
        return measured[path]

    monkeypatch.setattr(engine, "time_path", recording)
    pefttriton.set_strategy_autotune(True)
    t = make_inputs(gen, 33, 6, 5, 3, requires_grad=("x", "A", "B"))
    lowrank_linear(*[t[k] for k in NAMES]).sum().backward()
    (key, path), = pefttriton.strategy_cache().items()
    assert sorted(measured) == ["lean", "weight"] and key[-2] == "factors"
    assert path == min(measured, key=measured.get) == pefttriton.last_path()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        pefttriton.set_strategy_autotune("yes")


def test_compiled_call_resolves_the_same_path_forward_and_backward(gen):
    """Under torch.compile the op resolves the strategy itself; both halves agree with eager."""
    t = make_inputs(gen, 37, 70, 45, 5, requires_grad=("x", "d", "b"))
    args = [t[k] for k in NAMES]
    y_eager = lowrank_linear(*args, scale=0.5)
    g_eager = torch.autograd.grad(y_eager.sum(), t["x"])[0]
    for name in ("weight", "lean"):
        with pefttriton.use_strategy(name):
            compiled = torch.compile(lambda *a: lowrank_linear(*a, scale=0.5), backend="aot_eager", fullgraph=True)
            y = compiled(*args)
            g = torch.autograd.grad(y.sum(), t["x"])[0]
        assert rel_err(y, y_eager) < 1e-5 and rel_err(g, g_eager) < 1e-5


@pytest.mark.parametrize("path", ["lean", "weight", "?vectors", "?factors", "lean+dropout", "?all+dropout"])
def test_custom_op_passes_opcheck_on_every_torch_path(gen, path):
    """Schema, fake implementation, autograd registration and AOT dispatch, per path ("?...": the
    placeholder torch.compile passes, resolved when the op runs), with and without dropout (the
    seeds fix the masks, so repeated runs agree)."""
    ops = importlib.import_module("pefttriton.ops.lowrank_linear")  # the package exports the function
    t = make_inputs(gen, 6, 5, 7, 2, lead=(2, 3), requires_grad=("x", "A", "d", "b"))
    dropout = path.endswith("dropout")
    op_path = path.removesuffix("+dropout") if not path.startswith("?") else path
    seeds = torch.tensor([123], dtype=torch.int64) if dropout else None
    args = (*[t[k] for k in NAMES], 0.5, op_path, seeds, [0.25 if dropout else 0.0], [2])
    torch.library.opcheck(ops._lowrank_linear_fwd, args)


# ------------------------------------------------------------------------ the cost model


def _hand_flops(path: str, trains: str, shape) -> int:
    """Flops of one call written out by hand from the formulas (2 M N K per product), independently
    of the cost model's table of products."""
    T, n, m, r = shape
    x_grad = trains != "none"
    factors, vectors = trains in ("factors", "all"), trains in ("vectors", "all")
    if path == "weight":
        fwd = 2 * m * r * n + 2 * T * m * n + (2 * T * r * n if factors or vectors else 0)
    else:
        fwd = 2 * T * r * n + 2 * T * m * n + 2 * T * m * r
    if not x_grad:
        return fwd
    bwd = 2 * T * m * r if (path != "weight" or factors) else 0  # (b * g) B, for gh and grad_d
    bwd += 2 * m * r * T  # P = g^T (x A^T), for grad_B / grad_d / grad_b (x trains in every case here)
    if factors:
        bwd += 2 * r * n * T  # grad_A = gh^T x
    bwd += 2 * m * r * n + 2 * T * n * m if path == "weight" else 2 * T * n * m + 2 * T * n * r  # grad_x
    return fwd + bwd


@pytest.mark.parametrize("trains", ["none", "vectors", "factors", "all"])
@pytest.mark.parametrize("path", ["lean", "weight", "fused", "split"])
def test_cost_model_counts_the_flops_of_each_path(path, trains):
    """The products the cost model charges add up to the hand-written flop count of each path and
    each case of what trains (a wrong entry of its table would change the choices unnoticed).
    (Triton paths: the low-rank gradients by BLAS; the kernel replaces two products by one pass.)"""
    from pefttriton.ops import strategy as chooser

    shape = (300, 70, 50, 6)
    products = chooser._gemms(path, shape, trains, sixteen_bit=False, grad_kernel=False)
    assert sum(2 * M * N * K for M, N, K, _, _ in products) == _hand_flops(path, trains, shape)
    if path in ("fused", "split") and trains != "none":
        kernel = chooser._gemms(path, shape, trains, sixteen_bit=False, grad_kernel=True)
        assert [p for p in kernel if p[3] == "lowrank_grad"] == [(300, 6, 50, "lowrank_grad", 0)]


def test_device_models_and_the_low_rank_backward_choice(monkeypatch):
    """H100 and H200 are told apart by name, another GPU is scaled by its SM count; the Triton paths'
    low-rank backward takes BLAS where the latency-bound kernel loses, the kernel where it wins."""
    from dataclasses import replace

    from pefttriton.ops import strategy as chooser

    assert chooser._cuda_model("NVIDIA H200", 132) is chooser.H200
    assert chooser._cuda_model("NVIDIA H100 80GB HBM3", 132) is chooser.H100
    assert chooser._cuda_model("NVIDIA H100 PCIe", 114).sms == 114
    a100 = chooser._cuda_model("NVIDIA A100-SXM4-80GB", 108)
    assert a100.sms == 108 and a100.flops["bf16"] < chooser.H100.flops["bf16"] and not a100.measured
    assert chooser.H200.bandwidth > chooser.H100.bandwidth
    # the kernel's latency model: 8192 tokens, 4096 out, r = 16: 128 programs (one wave), 256 steps
    assert chooser.grad_kernel_seconds(chooser.H100, 8192, 4096, 16) == pytest.approx(256 * chooser.H100.grad_step + chooser.H100.launch)
    assert chooser.grad_kernel_seconds(chooser.H100, 8192, 4096, 256) == pytest.approx(4 * 256 * chooser.H100.grad_step + chooser.H100.launch)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # model the GPU from this machine
    for shape, trains in (((8192, 4096, 4096, 16), "factors"), ((8192, 4096, 4096, 256), "vectors")):
        assert chooser.lowrank_backward(cuda, torch.bfloat16, shape, trains) == "blas"
        assert chooser.estimate("fused", cuda, torch.bfloat16, shape, trains) == min(
            chooser.estimate("fused", cuda, torch.bfloat16, shape, trains, way) for way in ("kernel", "blas"))
    fast = replace(chooser.H100, grad_step=1e-9)  # a kernel that is not latency-bound wins: one pass over g
    monkeypatch.setattr(chooser, "H100", fast)
    chooser.clear_strategy_cache()
    assert chooser.lowrank_backward(cuda, torch.bfloat16, (8192, 4096, 4096, 256), "vectors") == "kernel"
    with chooser.use_lowrank_backward("blas"):
        assert chooser.lowrank_backward(cuda, torch.bfloat16, (8192, 4096, 4096, 256), "vectors") == "blas"
    with pytest.raises(ValueError, match="lowrank backward must be one of"):
        chooser.use_lowrank_backward("cublas").__enter__()


@pytest.mark.parametrize("way", ["kernel", "blas"])
@pytest.mark.parametrize("name", ["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("adapter", ["vera", "lora", "all"])
def test_triton_paths_with_either_low_rank_backward(gen, way, name, dtype, adapter):
    """The Triton paths' backward computes the low-rank gradients with the kernel or with BLAS: both
    equal float64, for VeRA (d, b), LoRA (A, B) and everything training at once."""
    from pefttriton.ops import strategy as chooser

    grads = {"vera": ("x", "d", "b"), "lora": ("x", "A", "B"), "all": ("x", "weight", "bias", "A", "B", "d", "b")}[adapter]
    t = make_inputs(gen, 37, 23, 29, 5, dtype=dtype, d=adapter != "lora", b=adapter != "lora", requires_grad=grads)
    with pefttriton.use_backend("triton"), pefttriton.use_strategy(name), chooser.use_lowrank_backward(way):
        check_against_reference(t, scale=0.7, tol=TOL[dtype], gen=gen)
        assert pefttriton.last_path() == name


# ------------------------------------------------------------- the Hopper GEMM (TMA, persistent)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_tma_gemm_against_float64(gen, dtype):
    """The TMA variant of the fused GEMM (tensor descriptors, persistent tile loop) computes what
    the pointer kernel does: forward with every flag, and ``x w`` read through a transposed view
    (grad_x's ``g W``), at sizes that are not tile multiples; it is launched, not the pointer kernel."""
    M, K, N, R = 70, 40, 56, 5
    x = torch.randn(M, K, generator=gen, device=DEVICE).to(dtype)
    w = (torch.randn(N, K, generator=gen, device=DEVICE) / K**0.5).to(dtype)
    h = torch.randn(M, R, generator=gen, device=DEVICE)
    B = torch.randn(N, R, generator=gen, device=DEVICE).to(dtype)
    d, b = torch.randn(R, generator=gen, device=DEVICE), torch.randn(N, generator=gen, device=DEVICE)
    bias = torch.randn(N, generator=gen, device=DEVICE).to(dtype)
    assert kernels.tma_supported(x, w) and kernels.tma_supported(x, w.T.contiguous().T)
    launched = []
    real = kernels._launch_gemm_tma
    kernels._launch_gemm_tma = lambda *a: launched.append(1) or real(*a)
    try:
        y = kernels.fused_gemm(x, w, bias, h, B, d, b, 0.7, tma=True)
        g = torch.randn(M, N, generator=gen, device=DEVICE).to(dtype)
        A_t = torch.randn(K, R, generator=gen, device=DEVICE).to(dtype)
        gx = kernels.fused_gemm(g, w.T, None, h, A_t, tma=True)  # (M, N) @ (N, K): w read as (K, N)
    finally:
        kernels._launch_gemm_tma = real
    assert launched == [1, 1]
    xd, wd, hd = x.double(), w.double(), h.double()
    want = xd @ wd.T + bias.double() + b.double() * ((0.7 * d.double() * hd) @ B.double().T)
    assert rel_err(y, want) < TOL[dtype]
    assert rel_err(gx, g.double() @ wd + hd @ A_t.double().T) < TOL[dtype]


def test_tma_needs_aligned_unit_stride_inputs(gen):
    """TMA's rules (16-byte aligned base and leading stride, one unit stride) decide; elsewhere the
    pointer kernel runs and the result is the same. IEEE fp32 dots have no TMA variant."""
    x = torch.randn(9, 24, generator=gen, device=DEVICE).half()
    w = torch.randn(10, 24, generator=gen, device=DEVICE).half()
    assert kernels.tma_supported(x, w)
    assert not kernels.tma_supported(x[:, 1:], w[:, 1:])  # base 2 bytes off
    assert not kernels.tma_supported(torch.randn(9, 23, device=DEVICE).half(), torch.randn(10, 23, device=DEVICE).half())  # 46-byte rows
    assert not kernels.tma_supported(x[:, ::2], w[:, ::2])  # no unit stride
    assert not kernels.tma_supported(x.float(), w.float())  # IEEE fp32: FMA units, no TMA variant
    odd = kernels.fused_gemm(x[:, 1:], w[:, 1:], tma=True)
    assert rel_err(odd, x[:, 1:].double() @ w[:, 1:].double().T) < TOL[torch.float16]


@pytest.mark.parametrize("name", ["fused"])
@pytest.mark.parametrize("adapter", ["vera", "lora"])
def test_engine_with_the_tma_gemm(gen, name, adapter):
    """The engine's fused strategy with the Hopper GEMM forced: forward and every gradient against
    float64 (grad_x runs the variant on W's transposed view)."""
    from pefttriton.ops import strategy as chooser

    vera = adapter == "vera"
    t = make_inputs(gen, 37, 24, 40, 5, dtype=torch.float16, d=vera, b=vera,
                    requires_grad=("x", "d", "b", "bias") if vera else ("x", "A", "B"))
    launched = []
    real = kernels._launch_gemm_tma
    kernels._launch_gemm_tma = lambda *a: launched.append(1) or real(*a)
    try:
        with pefttriton.use_backend("triton"), pefttriton.use_strategy(name), chooser.use_gemm_kernel("tma"):
            check_against_reference(t, scale=0.7, tol=TOL[torch.float16], gen=gen)
    finally:
        kernels._launch_gemm_tma = real
    assert len(launched) == 2  # forward and grad_x
    assert chooser.gemm_kernel(torch.device("cuda"), torch.bfloat16) == "pointer"  # unmeasured: never chosen
