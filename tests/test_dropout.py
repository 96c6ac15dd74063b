"""Dropout of the adapter's input inside the engine, without storing a dropped copy of ``x``.

PEFT computes ``y = x W^T + bias + s B A drop(x)``: the base GEMM reads ``x``, the low-rank path
a dropped copy. The engine draws one seed per rank segment and regenerates the mask from it
wherever ``x`` is read for the adapter (the Triton kernels inside their tiles, the PyTorch paths
from a seeded generator); eager calls on the CPU keep the PyTorch paths' mask as bits instead,
as the CPU's generator is slow. Each check compares the engine with the float64 formula evaluated on
the masks the call drew (``dropout_masks`` rebuilds them from the seeds, which the tests catch
by wrapping the seed draw).
"""

import importlib

import pytest
import torch
from helpers import DEVICE, rel_err

import pefttriton
from pefttriton import lowrank_linear
from pefttriton.kernels import lowrank_linear as kernels
from pefttriton.ops.naive import lowrank_linear_reference

engine = importlib.import_module("pefttriton.ops.lowrank_linear")
NAMES = ("x", "weight", "bias", "A", "B", "d", "b")
BACKEND = {"lean": "torch", "fused": "triton", "split": "triton"}
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.fixture
def seeds_drawn(monkeypatch):
    """The seeds each call draws, in order."""
    drawn = []
    real = engine._draw_seeds

    def recording(count, device):
        seeds = real(count, device)
        drawn.append(seeds)
        return seeds

    monkeypatch.setattr(engine, "_draw_seeds", recording)
    return drawn


def _inputs(gen, N, n, m, r, dtype, vera):
    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, device=DEVICE) * s).to(dtype)

    t = {"x": rnd(N, n), "weight": rnd(m, n, s=n**-0.5), "bias": rnd(m), "A": rnd(r, n, s=n**-0.5),
         "B": rnd(m, r, s=r**-0.5), "d": None, "b": None}
    if vera:
        t["d"], t["b"] = rnd(r).float(), rnd(m).float()
    trains = ("x", "d", "b") if vera else ("x", "A", "B", "bias")
    for k in trains:
        t[k].requires_grad_(True)
    return t, trains


def _reference(t, scale, masks, probs, ranks):
    """The float64 formula on ``drop(x)`` built from the masks, one per rank segment; segments
    are separate low-rank paths summed (the concatenated ranks of several adapters)."""
    ref = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in t.items()}
    x = ref["x"]
    y = x @ ref["weight"].T + ref["bias"]
    lo = 0
    for mask, p, r in zip(masks, probs, ranks):
        hi = lo + r
        u = x if mask is None else x * mask.double() / (1 - p)
        d = ref["d"][lo:hi] if ref["d"] is not None else None
        y = y + lowrank_linear_reference(u, torch.zeros_like(ref["weight"]), None, ref["A"][lo:hi], ref["B"][:, lo:hi],
                                         d, ref["b"], scale)
        lo = hi
    return y, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["lean", "fused", "split"])
@pytest.mark.parametrize("vera", [False, True], ids=["lora", "vera"])
@pytest.mark.parametrize("segments", [((0.3,), (5,)), ((0.1, 0.0, 0.5), (2, 3, 4))], ids=["one", "three"])
def test_forward_and_every_gradient_with_the_drawn_masks(gen, seeds_drawn, dtype, path, vera, segments):
    probs, ranks = segments
    N, n, m, r = 37, 29, 23, sum(ranks)
    t, trains = _inputs(gen, N, n, m, r, dtype, vera)
    scale = 0.7
    with pefttriton.use_backend(BACKEND[path]), pefttriton.use_strategy(path):
        y = lowrank_linear(*[t[k] for k in NAMES], scale=scale, dropout=list(probs), rank_segments=list(ranks))
        assert pefttriton.last_path() == path
    g = torch.randn(y.shape, generator=gen, device=DEVICE).to(dtype)
    grads = torch.autograd.grad(y, [t[k] for k in trains], g)
    (seeds,) = seeds_drawn
    masks = engine.dropout_masks(path, seeds, probs, ranks, N, n, dtype)
    for mask, p in zip(masks, probs):
        assert (mask is None) == (p == 0)
    y_ref, ref = _reference(t, scale, masks, probs, ranks)
    ref_grads = torch.autograd.grad(y_ref, [ref[k] for k in trains], g.double())
    assert rel_err(y, y_ref) < TOL[dtype]
    for name, got, want in zip(trains, grads, ref_grads):
        assert rel_err(got, want) < TOL[dtype], name
    # the check can fail: the same outputs without the masks differ
    y_nodrop, _ = _reference(t, scale, [None] * len(probs), probs, ranks)
    assert rel_err(y, y_nodrop) > 3 * TOL[dtype]


@pytest.mark.interpreter
def test_masks_agree_between_the_kernels_and_have_the_right_rate():
    """Keep rate within 4 sigma of 1 - p over 10^6 draws; the three kernel sites (x tiles, x^T
    tiles, the masked product) draw one mask; other seeds draw independent masks."""
    rows, cols, p = 1000, 1000, 0.3
    seed = torch.tensor([2024], dtype=torch.int64, device=DEVICE)
    keep = kernels.dropout_keep(kernels.Dropout(seed, p, cols), rows)
    sigma = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * sigma
    other = kernels.dropout_keep(kernels.Dropout(seed + 1, p, cols), rows)
    both = (keep & other).float().mean().item()  # independent masks: P(both kept) = (1 - p)^2
    assert abs(both - (1 - p) ** 2) < 4 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / keep.numel()) ** 0.5
    # the torch path's mask: the same rate, from a seeded generator
    torch_keep = engine._Drop(torch.tensor([7]), [p], [1]).keep(0, (rows, cols), torch.device("cpu"), torch.float32)
    assert abs(torch_keep.float().mean().item() - (1 - p)) < 4 * sigma
    # small tensors: the three sites of the kernels apply the same mask
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(37, 29, generator=gen, device=DEVICE)
    A = torch.randn(5, 29, generator=gen, device=DEVICE)
    gh = torch.randn(37, 5, generator=gen, device=DEVICE)
    drop = kernels.Dropout(seed, p, 29)
    mask = kernels.dropout_keep(drop, 37)
    xd = x * mask / (1 - p)
    assert rel_err(kernels.fused_gemm(x, A, dropout=drop, dropout_on="x"), xd @ A.T) < 1e-5
    assert rel_err(kernels.fused_gemm(gh.T, x.T, dropout=drop, dropout_on="w"), gh.T @ xd) < 1e-5
    base = torch.randn(37, 29, generator=gen, device=DEVICE)
    assert rel_err(kernels.add_lowrank_(base.clone(), gh, A.T, dropout=drop), base + mask * (gh @ A) / (1 - p)) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_new_mask_per_call_reproduced_by_manual_seed(gen, backend):
    t, _ = _inputs(gen, 16, 12, 10, 3, torch.float32, vera=False)
    args = [t[k].detach() if t[k] is not None else None for k in NAMES]
    with pefttriton.use_backend(backend):
        torch.manual_seed(5)
        first, second = (lowrank_linear(*args, dropout=0.5) for _ in range(2))
        torch.manual_seed(5)
        again = lowrank_linear(*args, dropout=0.5)
    assert not torch.equal(first, second) and torch.equal(first, again)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_checkpoint_recompute_draws_the_same_mask(gen, backend, use_reentrant):
    """Under activation checkpointing the recompute restores the RNG state, so it draws the
    forward's seeds and mask: the gradients equal a plain run's from the same RNG state."""
    from torch.utils.checkpoint import checkpoint

    t, trains = _inputs(gen, 16, 12, 10, 3, torch.float32, vera=False)

    def run(wrap):
        leaves = {k: (t[k].detach().requires_grad_(k in trains) if t[k] is not None else None) for k in NAMES}

        def f(x):
            return lowrank_linear(x, *[leaves[k] for k in NAMES[1:]], dropout=0.4)

        torch.manual_seed(11)
        with pefttriton.use_backend(backend):
            y = wrap(f, leaves["x"])
            y.square().sum().backward()
        return y.detach(), [leaves[k].grad for k in trains]

    plain = run(lambda f, x: f(x))
    ckpt = run(lambda f, x: checkpoint(f, x, use_reentrant=use_reentrant))
    assert torch.equal(plain[0], ckpt[0])
    for a, b in zip(plain[1], ckpt[1]):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("path", ["lean", "fused"])
def test_no_mask_and_no_dropped_copy_saved(gen, path):
    """Saved for backward with dropout: x A^T, the seeds, and x only when A trains; never a mask
    or a dropped copy of x (nothing else of x's size); on the CPU's PyTorch path the mask as bits
    (N x ceil(n / 8) bytes), when backward reads it (x or A trains)."""
    N, n, m, r = 64, 40, 48, 8
    for vera in (True, False):
        t, _ = _inputs(gen, N, n, m, r, torch.float32, vera)
        saved = []

        def pack(tensor):
            saved.append(tensor)
            return tensor

        with pefttriton.use_backend(BACKEND[path]), pefttriton.use_strategy(path):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                y = lowrank_linear(*[t[k] for k in NAMES], dropout=0.2)
            y.sum().backward()
        big = [s for s in saved if s.numel() == N * n]
        if vera:
            assert big == []
        else:
            assert len(big) == 1 and big[0] is t["x"]
        assert any(s.dtype == torch.int64 and s.numel() == 1 for s in saved)  # the seed
        bits = [s for s in saved if s.dtype == torch.uint8]
        if path == "lean" and DEVICE.type == "cpu":
            assert [b.shape for b in bits] == [(N, (n + 7) // 8)]
        else:
            assert bits == []


def test_bits_are_the_mask():
    """pack_bits against numpy's packbits (little bit order) at widths that do and do not fill a
    byte; unpack_bits undoes it."""
    np = pytest.importorskip("numpy")
    gen = torch.Generator().manual_seed(3)
    for n in (1, 7, 8, 29, 64):
        keep = torch.rand(13, n, generator=gen) < 0.5
        bits = engine.pack_bits(keep)
        assert torch.equal(bits, torch.from_numpy(np.packbits(keep.numpy(), axis=1, bitorder="little")))
        assert torch.equal(engine.unpack_bits(bits, n), keep)


@pytest.mark.cpu_only  # the CPU keeps the mask; other devices draw it again
def test_cpu_backward_reads_the_kept_mask_and_draws_nothing(gen, monkeypatch):
    """Forward draws the mask once per dropping segment; backward draws none, and its gradients
    equal those of a backward that draws the mask again from the seeds."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Draws(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.bernoulli_, torch.ops.aten.bernoulli):
                Draws.count += 1
            return func(*args, **(kwargs or {}))

    t, trains = _inputs(gen, 37, 29, 23, 9, torch.float32, vera=False)
    args = [t[k] for k in NAMES]

    def step():
        torch.manual_seed(4)
        y = lowrank_linear(*args, dropout=[0.3, 0.0, 0.5], rank_segments=[2, 3, 4])
        forward = Draws.count
        return forward, torch.autograd.grad(y, [t[k] for k in trains], torch.ones_like(y))

    with pefttriton.use_backend("torch"), pefttriton.use_strategy("lean"), Draws():
        forward, kept = step()
        assert forward == 2 and Draws.count == 2  # two dropping segments, drawn in forward only
        monkeypatch.setattr(engine._Drop, "packed", lambda self: [])  # backward draws from the seeds
        _, drawn = step()
        assert Draws.count == 2 + 2 + 2
    for name, a, b in zip(trains, kept, drawn):
        assert torch.equal(a, b), name


def test_dropout_arguments_are_checked(gen):
    t, _ = _inputs(gen, 4, 6, 5, 3, torch.float32, vera=False)
    args = [t[k] for k in NAMES]
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(ValueError, match="dropout must be a probability"):
            lowrank_linear(*args, dropout=bad)
    with pytest.raises(ValueError, match="rank_segments must be positive ints summing to the rank 3"):
        lowrank_linear(*args, rank_segments=[1, 1])
    with pytest.raises(ValueError, match="one probability per rank segment"):
        lowrank_linear(*args, dropout=[0.1], rank_segments=[1, 2])
    with pefttriton.use_backend("torch"), pefttriton.use_strategy("weight"), pytest.warns(UserWarning, match="cannot drop"):
        lowrank_linear(*args, dropout=0.1)
        assert pefttriton.last_path() == "lean"
