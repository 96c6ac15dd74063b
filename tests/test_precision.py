"""Where the fused op rounds, and that it never rounds worse than PEFT's order of operations.

* 16 bits: the low-rank path rounds ``h`` (tokens x rank) and ``B`` before their product. With
  ``scale`` folded into ``h`` first, ``x = 4`` over 1024 features, ``A = 1`` and ``scale = 32`` gave
  ``h = 131072``: ``inf`` in float16, where PEFT's order (``x A^T``, then ``B``, then ``scale``)
  gives 131.
* float64 inputs with float32 vectors ``d``, ``b`` (allowed, like PEFT's fp32 adapter weights): the
  scale of the rank dimension must be formed in float64 (it was float32 on the torch backend:
  1.5e-9 relative error against 3e-16 on Triton).
"""

import pytest
import torch
from helpers import rel_err

from pefttriton import lowrank_linear
from pefttriton.ops.lowrank_linear import split_scale
from pefttriton.ops.naive import lowrank_linear_reference


def _peft_order(x, weight, A, B, scale):
    """PEFT LoRA's forward in the inputs' own dtype: base, then ((x A^T) B^T) * scale."""
    return x @ weight.T + ((x @ A.T) @ B.T) * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [32.0, -32.0, 500.0])
def test_large_scale_does_not_overflow_16_bit(backend, dtype, scale):
    n, r = 1024, 2
    x = torch.full((3, n), 4.0, dtype=dtype, requires_grad=True)  # x A^T = 4096 per rank: fits in fp16
    weight = torch.zeros(5, n, dtype=dtype, requires_grad=True)
    A = torch.ones(r, n, dtype=dtype, requires_grad=True)
    B = torch.full((5, r), 5e-4, dtype=dtype, requires_grad=True)
    peft = _peft_order(x.double(), weight.double(), A.double(), B.double(), scale)
    if dtype == torch.float16:  # the premise: PEFT's own order stays finite in fp16
        assert torch.isfinite(_peft_order(x, weight, A, B, scale)).all()
    y = lowrank_linear(x, weight, None, A, B, scale=scale)
    assert torch.isfinite(y).all(), "overflow in the low-rank path"
    assert rel_err(y, peft) < 1e-2
    # grad_B = scale * g^T (x A^T) is itself above 65504 for g = 1: take g small enough that every
    # true gradient fits in fp16, so any inf comes from an intermediate.
    g = torch.full_like(peft, 1e-3)
    y.backward(g.to(dtype))
    ref = [t.detach().double().requires_grad_(True) for t in (x, weight, A, B)]
    lowrank_linear_reference(ref[0], ref[1], None, ref[2], ref[3], scale=scale).backward(g)
    for name, t, t_ref in zip(("x", "weight", "A", "B"), (x, weight, A, B), ref):
        assert torch.isfinite(t.grad).all(), name
        assert rel_err(t.grad, t_ref.grad) < 1e-2, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_scale_with_vectors_does_not_overflow_16_bit(backend, dtype):
    """VeRA's vectors ride along: d and b see the same split, and grad_d, grad_b stay finite."""
    n, r, m = 1024, 3, 6
    x = torch.full((4, n), 4.0, dtype=dtype)
    weight = torch.zeros(m, n, dtype=dtype)
    A = torch.ones(r, n, dtype=dtype)
    B = torch.full((m, r), 5e-4, dtype=dtype)
    d = torch.full((r,), 1.5, requires_grad=True)
    # not symmetric about 0: with sum(b) = 0 the true grad_d is exactly 0 and a relative error
    # against it measures only the order of summation
    b = torch.linspace(-1.0, 2.0, m, requires_grad=True)
    y = lowrank_linear(x, weight, None, A, B, d, b, scale=40.0)
    args = [x, weight, None, A, B, d, b]
    ref = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in args]
    y_ref = lowrank_linear_reference(*ref, scale=40.0)
    assert rel_err(y, y_ref) < 1e-2
    g = torch.ones_like(y_ref)
    y.backward(g.to(dtype))
    y_ref.backward(g)
    assert rel_err(d.grad, ref[5].grad) < 1e-2 and rel_err(b.grad, ref[6].grad) < 1e-2


def test_split_scale():
    for scale in (0.0, 0.3, -0.7, 1.0, 2.0, -64.0):
        h, big = split_scale(scale)
        assert h * big == scale and abs(h) <= 1.0 and big >= 1.0


def test_fp64_input_with_fp32_vectors(backend, gen):
    """float64 x with float32 d, b: every product in float64 (the vectors are exact in float64)."""
    N, n, m, r = 17, 23, 19, 5
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x, weight, bias, A, B = rnd(N, n), rnd(m, n), rnd(m), rnd(r, n), rnd(m, r)
    d, b = rnd(r).float(), rnd(m).float()
    scale = 0.1  # not exact in float32: a float32 d * scale loses it
    y = lowrank_linear(x, weight, bias, A, B, d, b, scale=scale)
    y_ref = lowrank_linear_reference(x, weight, bias, A, B, d.double(), b.double(), scale=scale)
    assert y.dtype == torch.float64
    assert rel_err(y, y_ref) < 1e-13


@pytest.fixture
def tf32_through_the_new_api():
    """PyTorch's fp32 matmul precision set to TF32 through the API of torch >= 2.9 (restored after)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has only the legacy allow_tf32 flag")
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    yield
    matmul.fp32_precision = previous


def test_tf32_set_through_the_new_api_is_read_without_error(tf32_through_the_new_api, monkeypatch):
    """Once the new API set TF32, reading the legacy allow_tf32 raises; pefttriton reads the new one
    (the kernels' dot precision, the cost model on CUDA); every strategy still runs (below)."""
    import pefttriton
    from pefttriton.kernels import launch
    from pefttriton.ops import strategy

    with pytest.raises(RuntimeError, match="legacy and new APIs"):  # the trap the old code fell into
        _ = torch.backends.cuda.matmul.allow_tf32
    assert launch.tf32_allowed()
    monkeypatch.setattr(launch, "INTERPRET", False)  # what a GPU run reads
    assert launch.input_precision(torch.float32) == "tf32" and launch.input_precision(torch.bfloat16) == "ieee"
    monkeypatch.undo()
    cuda = torch.device("cuda")
    shape = (4096, 1024, 1024, 16)
    assert strategy.estimate("fused", cuda, torch.float32, shape) < strategy.estimate("fused", cuda, torch.float32, shape, "all")
    assert strategy.choose(cuda, torch.float32, shape, "vectors", ("fused", "split", "lean", "weight")) in pefttriton.ops.backend.PATHS
    with launch.allow_tf32(False):
        assert not launch.tf32_allowed() and torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert launch.tf32_allowed()


@pytest.mark.interpreter
def test_every_strategy_runs_with_tf32_set_through_the_new_api(tf32_through_the_new_api):
    import pefttriton

    gen = torch.Generator().manual_seed(0)
    x, weight, A, B = (torch.randn(*size, generator=gen, dtype=torch.float64) for size in ((9, 12), (7, 12), (3, 12), (7, 3)))
    want = lowrank_linear_reference(x, weight, None, A, B, scale=0.5)
    for backend, strategies in (("torch", ("auto", "lean", "weight")), ("triton", ("auto", "fused", "split"))):
        for name in strategies:
            with pefttriton.use_backend(backend), pefttriton.use_strategy(name):
                x32 = x.float().requires_grad_(True)
                y = lowrank_linear(x32, weight.float(), None, A.float(), B.float(), scale=0.5)
                y.sum().backward()
            assert rel_err(y, want) < 1e-5 and x32.grad is not None, (backend, name)
