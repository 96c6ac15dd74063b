"""The 4-bit engine (``pefttriton.ops.quant4``): bitsandbytes' layout, read bit for bit, and the fused op
on it against float64 references, on both backends (Triton in the interpreter), with its memory
promises checked by allocation tracking.

References, independent of the code under test: :mod:`pefttriton.ops.quant4_reference` (the
published code books and bitsandbytes' storage layout, float64), bitsandbytes itself (its
``quantize_4bit`` / ``dequantize_4bit`` on the CPU) and ``pefttriton.ops.naive.lowrank_linear_reference``
on the float64 dequantized weight.
"""

import weakref

import pytest
import torch
from helpers import rel_err
from torch.utils._python_dispatch import TorchDispatchMode

import pefttriton
from pefttriton.kernels import lowrank_linear_4bit as kernels_4bit
from pefttriton.ops import quant4
from pefttriton.ops.naive import lowrank_linear_reference
from pefttriton.ops.quant4 import Quant4Weight, dequantize_4bit, lowrank_linear_4bit
from pefttriton.ops.quant4_reference import (
    code_book,
    dequantize_4bit_reference,
    dynamic_code_book,
    quantize_4bit_reference,
)

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
GRADS = ("x", "bias", "A", "B", "d", "b")

# (m, n, blocksize): one per kernel layout. ALIGNED with one absmax per tile row (n % 64 == 0) and
# with several (blocksize 16 < the interpreter's 32-wide tiles), PAIRED (n even), UNPAIRED (n odd;
# 15 * 45 elements is odd too: the last byte is half used, the last block short).
LAYOUTS = {
    "aligned": (45, 128, 64),
    "aligned-groups": (70, 64, 16),
    "paired": (45, 70, 64),
    "unpaired": (15, 45, 32),
}


def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional")


def from_bitsandbytes(packed, state) -> Quant4Weight:
    """A Quant4Weight over bitsandbytes' own tensors (what pefttriton.integration.quantized reads)."""
    nested = state.nested
    return Quant4Weight(
        packed.view(torch.uint8).reshape(-1), state.absmax, state.code, tuple(state.shape), state.blocksize,
        state.quant_type, state.state2.absmax if nested else None, state.state2.code if nested else None,
        state.offset if nested else None, state.state2.blocksize if nested else 256,
    )


def bnb_dequantize(bF, packed, state, dtype):
    state = bF.QuantState(state.absmax, state.shape, state.code, state.blocksize, state.quant_type, dtype,
                          state.offset, state.state2)
    return bF.dequantize_4bit(packed, state)


# ----------------------------------------------------------------------------- layout and references


def test_code_books_are_bitsandbytes():
    bF = bnb_functional()
    assert torch.equal(code_book("nf4"), bF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(code_book("fp4"), bF.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_code_book(), bF.create_dynamic_map())
    with pytest.raises(ValueError, match="quant_type"):
        code_book("int4")


@pytest.mark.parametrize("shape", [(24, 70), (15, 45)], ids=["even", "odd-count"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantizers_are_bit_exact_against_bitsandbytes(gen, quant_type, nested, blocksize, shape):
    """bitsandbytes quantizes; its dequantize_4bit, the float64 reference (rounded to float32, then
    to the dtype) and this package's torch dequantizer give the same bits, in every dtype."""
    bF = bnb_functional()
    W = torch.randn(shape, generator=gen, dtype=torch.float64).float() * 0.3
    packed, state = bF.quantize_4bit(W, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    weight = from_bitsandbytes(packed, state)
    reference = dequantize_4bit_reference(weight)
    assert reference.dtype == torch.float64 and reference.shape == shape
    assert rel_err(reference, W) < 0.2  # it is the weight, 4-bit close
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        # an odd in_features takes bitsandbytes' torch.compile'd fallback: run it eagerly (seconds saved)
        with torch.compiler.set_stance("force_eager"):
            expected = bnb_dequantize(bF, packed, state, dtype)
        assert torch.equal(reference.float().to(dtype), expected), dtype
        assert torch.equal(dequantize_4bit(weight, dtype, use_bitsandbytes=False), expected), dtype
        assert torch.equal(dequantize_4bit(weight, dtype), expected), dtype


def test_bit_exact_check_can_fail(gen):
    """The comparison above sees a nibble order swapped in one byte, and one absmax off by an ulp."""
    bF = bnb_functional()
    W = torch.randn(16, 64, generator=gen)
    packed, state = bF.quantize_4bit(W, blocksize=64, compress_statistics=False, quant_type="nf4")
    expected = bnb_dequantize(bF, packed, state, torch.float32)
    weight = from_bitsandbytes(packed, state)
    flat = weight.packed.clone()
    byte = int(torch.nonzero((flat >> 4) != (flat & 15))[0])
    flat[byte] = ((flat[byte] & 15) << 4) | (flat[byte] >> 4)
    swapped = Quant4Weight(flat, weight.absmax, weight.code, weight.shape, 64, "nf4")
    assert not torch.equal(dequantize_4bit_reference(swapped).float(), expected)
    nudged = Quant4Weight(weight.packed, torch.nextafter(weight.absmax, weight.absmax + 1), weight.code, weight.shape, 64, "nf4")
    assert not torch.equal(dequantize_4bit_reference(nudged).float(), expected)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reference_quantizer_matches_bitsandbytes(gen, quant_type):
    """Codes and float32 absmaxes bit for bit (odd element count included); the nested absmax
    indices where bitsandbytes' CPU lookup table finds the nearest code (it approximates)."""
    bF = bnb_functional()
    W = torch.randn(80, 99, generator=gen) * torch.rand(80, 1, generator=gen)  # blocks of many scales
    for nested in (False, True):
        packed, state = bF.quantize_4bit(W, blocksize=64, compress_statistics=nested, quant_type=quant_type)
        ours = quantize_4bit_reference(W, 64, quant_type, nested)
        theirs = from_bitsandbytes(packed, state)
        assert torch.equal(ours.packed, theirs.packed)
        assert torch.equal(ours.code, theirs.code)
        if not nested:
            assert torch.equal(ours.absmax, theirs.absmax)
            continue
        assert torch.equal(ours.offset, theirs.offset) and torch.equal(ours.absmax2, theirs.absmax2)
        assert torch.equal(ours.code2, theirs.code2)
        differ = ours.absmax != theirs.absmax
        assert differ.float().mean() < 0.02 and (ours.absmax.int() - theirs.absmax.int()).abs().max() <= 1
        # ours is the nearest code: never farther from the true absmax than bitsandbytes' pick
        true = bF.quantize_4bit(W, blocksize=64, compress_statistics=False, quant_type=quant_type)[1].absmax.double()
        ours_err = (quant4.absmax_fp32(ours).double() - true).abs()
        theirs_err = (quant4.absmax_fp32(theirs).double() - true).abs()
        assert (ours_err <= theirs_err + 1e-12).all()


def test_reference_quantizer_without_bitsandbytes(gen):
    """The GPU check's path: quantize and dequantize with this package alone; the error is 4-bit sized."""
    W = torch.randn(33, 64, generator=gen)
    for quant_type in ("nf4", "fp4"):
        for nested in (False, True):
            weight = quantize_4bit_reference(W, 64, quant_type, nested)
            back = dequantize_4bit_reference(weight)
            assert 0.01 < rel_err(back, W) < 0.2
            assert torch.equal(dequantize_4bit(weight, torch.float32, use_bitsandbytes=False), back.float())


# ----------------------------------------------------------------------------- the op


def make_case(gen, m, n, blocksize, *, nested=True, quant_type="nf4", dtype=torch.float32, tokens=(3, 7), r=5,
              vectors=True, bias=True):
    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt)

    weight = quantize_4bit_reference(rnd(m, n, dt=torch.float32) / n**0.5, blocksize, quant_type, nested)
    t = {
        "x": rnd(*tokens, n),
        "bias": rnd(m) if bias else None,
        "A": rnd(r, n) / n**0.5,
        "B": rnd(m, r),
        "d": rnd(r, dt=torch.float32) if vectors else None,
        "b": rnd(m, dt=torch.float32) if vectors else None,
    }
    for v in t.values():
        if v is not None:
            v.requires_grad_(True)
    return weight, t


def check_op(weight, t, scale, tol, gen):
    """Forward and every gradient against the float64 reference on the float64 dequantized weight."""
    args = [t[k] for k in GRADS]
    y = lowrank_linear_4bit(args[0], weight, *args[1:4], *args[4:], scale=scale)
    assert y.dtype == t["x"].dtype and y.shape == (*t["x"].shape[:-1], weight.shape[0])
    ref_args = [a.detach().double().requires_grad_() if a is not None else None for a in args]
    W = dequantize_4bit_reference(weight)
    y_ref = lowrank_linear_reference(ref_args[0], W, ref_args[1], ref_args[2], ref_args[3], ref_args[4], ref_args[5], scale)
    assert rel_err(y, y_ref) < tol, f"output: {rel_err(y, y_ref):.2e}"
    wrt = [k for k in GRADS if t[k] is not None]
    grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, [t[k] for k in wrt], grad_out.to(y.dtype))
    ref_grads = torch.autograd.grad(y_ref, [ref_args[GRADS.index(k)] for k in wrt], grad_out)
    for name, g, g_ref in zip(wrt, grads, ref_grads):
        assert g.dtype == t[name].dtype, name
        assert rel_err(g, g_ref) < tol, f"grad {name}: {rel_err(g, g_ref):.2e}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
def test_op_against_float64_reference(backend, gen, layout, nested):
    """VeRA-shaped (d, b, bias) in float32, every gradient; both backends, each kernel layout."""
    m, n, blocksize = LAYOUTS[layout]
    weight, t = make_case(gen, m, n, blocksize, nested=nested, quant_type="fp4" if nested else "nf4")
    assert kernels_4bit.layout(n, blocksize) == {"paired": kernels_4bit.PAIRED, "unpaired": kernels_4bit.UNPAIRED}.get(
        layout, kernels_4bit.ALIGNED)
    check_op(weight, t, 0.5, TOL[torch.float32], gen)
    assert (pefttriton.last_path() == "fused") == (backend == "triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_op_16_bit(backend, gen, dtype):
    """LoRA-shaped (no d, b), a scale above 1 (split between h and B); W rounded to the dtype as
    bitsandbytes rounds it. bf16 under the interpreter runs its dots in fp32 (design.md, pitfalls):
    the tiles are rounded to bf16 first, so the rounding is covered, the bf16 dot instruction is not."""
    weight, t = make_case(gen, 45, 128, 64, dtype=dtype, vectors=False)
    check_op(weight, t, 2.0, TOL[dtype], gen)


@pytest.mark.interpreter
@pytest.mark.cpu_only  # an identity of the interpreter's tiles; compiled kernels tile the two GEMMs differently
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounding_is_bitsandbytes_dequantized_weight(gen, dtype):
    """The Triton 4-bit op equals the dense Triton op on bitsandbytes' dequantized W bit for bit: W's
    tiles are dequantized exactly as bitsandbytes does, the rest is the same kernel math. (bf16: with
    B = 0, a fresh LoRA; under the interpreter the dense kernel keeps bf16 h and B in fp32 for its
    dot, where this one rounds them to bf16 as the GPU does.)"""
    weight, t = make_case(gen, 45, 128, 64, dtype=dtype, tokens=(16,))
    args = [t[k].detach() if t[k] is not None else None for k in GRADS]
    if dtype == torch.bfloat16:
        args[3] = torch.zeros_like(args[3])
    dense = dequantize_4bit(weight, dtype, use_bitsandbytes=False)
    with pefttriton.use_backend("triton"):
        y4 = lowrank_linear_4bit(args[0], weight, *args[1:], scale=0.5)
        y = pefttriton.lowrank_linear(args[0], dense, *args[1:], scale=0.5)
    assert torch.equal(y4, y)


@pytest.mark.interpreter
@pytest.mark.cpu_only  # auto picks the torch path on the CPU only
def test_paths(gen):
    """auto on the CPU: a torch path; the triton backend: the 4-bit kernel, also for strategy split
    (which needs a dense W); weight in 16 bits falls back with a warning, as for the dense op."""
    weight, t = make_case(gen, 45, 128, 64, vectors=False)
    args = (t["x"], weight, t["bias"], t["A"], t["B"])
    lowrank_linear_4bit(*args)
    assert pefttriton.last_path() in ("lean", "weight")
    with pefttriton.use_backend("triton"):
        for strategy in ("auto", "fused", "split"):
            with pefttriton.use_strategy(strategy):
                lowrank_linear_4bit(*args)
                assert pefttriton.last_path() == "fused"
        with pefttriton.use_strategy("lean"):
            lowrank_linear_4bit(*args)
            assert pefttriton.last_path() == "lean"
    weight16, t16 = make_case(gen, 45, 128, 64, dtype=torch.bfloat16, vectors=False)
    from pefttriton.ops import backend

    backend._WARNED.clear()
    with pefttriton.use_strategy("weight"), pytest.warns(UserWarning, match="strategy 'weight' cannot run here"):
        lowrank_linear_4bit(t16["x"], weight16, None, t16["A"], t16["B"])
        assert pefttriton.last_path() == "lean"


@pytest.mark.cpu_only  # CPU autocast
def test_autocast(gen):
    """Under autocast x, bias, A, B are cast to the autocast dtype and the output has it."""
    weight, t = make_case(gen, 45, 128, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lowrank_linear_4bit(t["x"], weight, t["bias"], t["A"], t["B"], t["d"], t["b"], 0.5)
    assert y.dtype == torch.bfloat16
    dense = dequantize_4bit_reference(weight)
    args = [t[k].detach().double() for k in GRADS]
    ref = lowrank_linear_reference(args[0], dense, *args[1:], scale=0.5)
    assert rel_err(y, ref) < TOL[torch.bfloat16]


def test_compiles_as_one_graph(gen):
    weight, t = make_case(gen, 45, 128, 64)

    def f(x, A, B, d, b):
        return lowrank_linear_4bit(x, weight, t["bias"], A, B, d, b, 0.5)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [t[k] for k in ("x", "A", "B", "d", "b")]
    y = compiled(*args)
    y.sum().backward()
    grads = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    y_eager = f(*args)
    y_eager.sum().backward()
    assert torch.equal(y, y_eager)
    for g, a in zip(grads, args):
        assert torch.allclose(g, a.grad, rtol=1e-6, atol=1e-6)


def test_errors_name_the_argument(gen):
    weight, t = make_case(gen, 45, 128, 64)
    x, A, B = t["x"], t["A"], t["B"]
    with pytest.raises(TypeError, match="weight must be a Quant4Weight"):
        lowrank_linear_4bit(x, torch.zeros(45, 128), None, A, B)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 128\)"):
        lowrank_linear_4bit(x[..., :100], weight, None, A, B)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        lowrank_linear_4bit(x.double(), weight, None, A, B)
    with pytest.raises(ValueError, match=r"B must have shape \(45, 5\)"):
        lowrank_linear_4bit(x, weight, None, A, B[:40])
    with pytest.raises(ValueError, match="packed must have shape"):
        Quant4Weight(weight.packed[1:], weight.absmax, weight.code, (45, 128), 64, "nf4",
                     weight.absmax2, weight.code2, weight.offset)
    with pytest.raises(TypeError, match="absmax must have dtype torch.uint8"):
        Quant4Weight(weight.packed, weight.absmax.float(), weight.code, (45, 128), 64, "nf4",
                     weight.absmax2, weight.code2, weight.offset)
    with pytest.raises(ValueError, match="given together"):
        Quant4Weight(weight.packed, weight.absmax, weight.code, (45, 128), 64, "nf4", weight.absmax2)
    with pytest.raises(ValueError, match="blocksize must be an even int"):
        Quant4Weight(weight.packed, weight.absmax, weight.code, (45, 128), 63, "nf4",
                     weight.absmax2, weight.code2, weight.offset)
    with pytest.raises(ValueError, match="quant_type"):
        Quant4Weight(weight.packed, weight.absmax, weight.code, (45, 128), 64, "int4",
                     weight.absmax2, weight.code2, weight.offset)
    plain = quantize_4bit_reference(torch.randn(45, 128), 64, "nf4", False)
    with pytest.raises(ValueError, match="absmax requires grad"):
        Quant4Weight(plain.packed, plain.absmax.requires_grad_(), plain.code, (45, 128), 64, "nf4")


# ----------------------------------------------------------------------------- memory


class AllocationTracker(TorchDispatchMode):
    """Every floating tensor of at least ``numel`` elements that a torch op creates (or views), kept by
    weak reference with the index of the 4-bit op call (forward or backward) that created it;
    ``worst`` is the most distinct storages of that size alive at once. It also
    looks inside pefttriton's 4-bit custom ops (which a dispatch mode otherwise sees as one call)
    by running their plain implementations under itself."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen, self.call, self.worst = numel, [], 0, 0
        self.impls = {
            torch.ops.pefttriton.lowrank_linear_4bit_fwd.default: quant4.forward_impl,
            torch.ops.pefttriton.lowrank_linear_4bit_bwd.default: quant4.backward_impl,
        }

    def alive(self):
        """(call, storage address) of every tracked tensor still alive; views share their base's."""
        return sorted({(call, ref().untyped_storage().data_ptr()) for call, ref in self.seen if ref() is not None})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.impls:
            self.call += 1
            with self:
                out = self.impls[func](*args, **kwargs)
            return out
        out = func(*args, **kwargs)
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.numel() >= self.numel:
                self.seen.append((self.call, weakref.ref(o)))
                alive = self.alive()
                assert all(call == self.call for call, _ in alive), "a W-sized tensor outlived its layer's call"
                self.worst = max(self.worst, len(alive))
        return out


def two_layer_step(gen, dtype=torch.float32):
    """Two 4-bit LoRA layers in a row, forward and backward; W (128 x 128) is the largest tensor."""
    weights = [quantize_4bit_reference(torch.randn(128, 128, generator=gen) / 11, 64, "nf4", True) for _ in range(2)]
    A = [torch.randn(4, 128, generator=gen, dtype=dtype).requires_grad_() for _ in range(2)]
    B = [torch.randn(128, 4, generator=gen, dtype=dtype).requires_grad_() for _ in range(2)]
    x = torch.randn(2, 8, 128, generator=gen, dtype=dtype).requires_grad_()

    def run():
        h = x
        for w, a, b in zip(weights, A, B):
            h = lowrank_linear_4bit(h, w, None, a, b, scale=0.5)
        h.square().sum().backward()

    return run, 128 * 128


def test_triton_path_never_materialises_w(gen):
    """Forward and backward through the 4-bit kernels create no floating tensor of W's size."""
    run, numel = two_layer_step(gen)
    tracker = AllocationTracker(numel)
    with pefttriton.use_backend("triton"), tracker:
        run()
    assert tracker.call == 4  # two forwards, two backwards, all looked into
    assert tracker.seen == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["lean", "weight"])
def test_torch_path_holds_one_layer_of_w(gen, strategy, dtype):
    """The torch path dequantizes W per call and drops it on return: every W-sized tensor dies
    within the call that made it (lean in bf16 also forms [W | B_eff], weight W + delta W)."""
    if strategy == "weight" and dtype == torch.bfloat16:
        pytest.skip("strategy weight runs in float32 / float64 only")
    run, numel = two_layer_step(gen, dtype)
    tracker = AllocationTracker(numel)
    with pefttriton.use_backend("torch"), pefttriton.use_strategy(strategy), tracker:
        run()
    assert tracker.call == 4 and tracker.seen  # the check saw W and would catch one left alive
    assert tracker.alive() == []
    assert tracker.worst <= 2


@pytest.mark.interpreter
def test_saved_tensors_are_small(gen):
    """Backward keeps x A^T (N, r) float32, x for grad_A, the adapter tensors and references to the
    quantized tensors themselves (the same storage, no copy); nothing of W's or y's size."""
    weight, t = make_case(gen, 96, 128, 64, tokens=(8,), vectors=False, bias=False)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    for backend in ("torch", "triton"):
        saved.clear()
        with pefttriton.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
            y = lowrank_linear_4bit(t["x"], weight, None, t["A"], t["B"], scale=0.5)
        floats = [s for s in saved if s.is_floating_point() and s.data_ptr() not in
                  (weight.absmax2.data_ptr(), weight.code.data_ptr(), weight.code2.data_ptr(), weight.offset.data_ptr())]
        assert sorted(tuple(s.shape) for s in floats) == sorted([(8, 128), (8, 5), (5, 128), (96, 5)]), backend
        ptrs = {s.data_ptr() for s in saved}
        assert weight.packed.data_ptr() in ptrs and weight.absmax.data_ptr() in ptrs
        y.sum().backward()
