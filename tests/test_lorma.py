"""LoRMA (``FusedLoRMALinear``, ``lorma_pi_linear``, ``shift_product``) against float64 references.

The references below are written from the definitions alone: the multiplier ``T`` is built as an
explicit (m, m) matrix (``shift`` as a ``torch.stack`` of rolled rows), the layer as
``x (T W0)^T + bias``, and plain autograd differentiates them. The "triton" backend runs the
Triton kernels through the CPU interpreter (conftest.py).
"""

import math
import warnings

import pytest
import torch
from helpers import rel_err
from torch import nn

import pefttriton
from pefttriton.tools.analysis import numerical_rank
from pefttriton.kernels import lorma_pi as kernels
from pefttriton.adapters.lorma import FusedLoRMALinear
from pefttriton.ops.lorma_pi import lorma_pi_linear, pi_extra_macs, pi_order, shift_product

VARIANTS = ("plus", "pi", "naive")
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}

# (tokens, in_features n, out_features m): multiples of no block size; the second has m > 64
# (several row blocks in every kernel) and n < 32.
SHAPES = [(13, 29, 37), (70, 19, 83)]


# ------------------------------------------------------------------------------- references


def shift_rows(P: torch.Tensor) -> torch.Tensor:
    """shift(P)[i, j] = P[i, (j - i) mod m]: row i of P rolled right by i."""
    return torch.stack([torch.roll(P[i], i) for i in range(P.shape[0])])


def ref_multiplier(variant: str, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    P = B @ A
    if variant == "plus":
        return torch.eye(P.shape[0], dtype=P.dtype) + s * P
    if variant == "pi":
        return s * shift_rows(P)
    return s * P


def ref_layer(variant, x, W0, bias, A, B, s):
    y = x @ (ref_multiplier(variant, A, B, s) @ W0).T
    return y + bias if bias is not None else y


def rnd(gen, *shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_layer(gen, n, m, r, variant, *, dtype=torch.float64, alpha=6.0, randomize=True, bias=True):
    base = nn.Linear(n, m, bias=bias).to(dtype)
    with torch.no_grad():
        base.weight.copy_(rnd(gen, m, n, scale=n**-0.5))
        if bias:
            base.bias.copy_(rnd(gen, m))
    layer = FusedLoRMALinear(base, r, alpha=alpha, variant=variant)
    if randomize:  # away from init (A = 0 would hide every gradient path through B)
        with torch.no_grad():
            layer.lorma_A.copy_(rnd(gen, r, m, scale=m**-0.5))
            layer.lorma_B.copy_(rnd(gen, m, r, scale=r**-0.5))
    return layer


# ------------------------------------------------------------------- the shift kernel alone


@pytest.mark.parametrize(
    "m, r, split",
    [(37, 1, None), (45, 3, None), (83, 20, 2), (150, 5, 3), (33, 70, None)],
    ids=["m37-r1", "m45-r3", "m83-r20-split2", "m150-r5-split3", "m33-r70"],
)
@pytest.mark.interpreter
def test_shift_kernels_match_rolled_rows(gen, m, r, split):
    """Kernel launchers vs torch.stack of rolled rows (float64): M, grad_B, grad_A.

    r = 20 and r = 70 exceed one K block of the forward kernel (16 under the interpreter) and
    r = 70 one rank block of the backward kernels (64); split > 1 reduces partial sums of the
    split K loop.
    """
    B = rnd(gen, m, r).requires_grad_(True)
    A = rnd(gen, r, m).requires_grad_(True)
    s = 0.7
    M_ref = s * shift_rows(B @ A)
    M = kernels.shift_product(B.detach(), A.detach(), s)
    assert M.dtype == torch.float64 and M.shape == (m, m) and M.is_contiguous()
    assert rel_err(M, M_ref) < 1e-13
    G = rnd(gen, m, m)
    gB_ref, gA_ref = torch.autograd.grad(M_ref, (B, A), G)
    gB, gA = kernels.shift_product_grads(G, B.detach(), A.detach(), s, split=split)
    assert rel_err(gB, gB_ref) < 1e-12
    assert rel_err(gA, gA_ref) < 1e-12
    if split is not None:  # the forced split really split the K loop
        assert kernels.split_chunk(m, 1, split) < m


@pytest.mark.interpreter
def test_shift_kernel_strided_and_fp32_inputs(gen):
    """Non-contiguous factors (transposed views) and fp32 -> fp32 output, against fp64."""
    m, r = 41, 6
    B = rnd(gen, r, m).T  # (m, r) view with strides (1, m)
    A = rnd(gen, m, r).T
    M = kernels.shift_product(B.float(), A.float(), 1.3)
    assert M.dtype == torch.float32
    assert rel_err(M, 1.3 * shift_rows(B @ A)) < 1e-6
    G = rnd(gen, m, m).T  # non-contiguous gradient
    gB, gA = kernels.shift_product_grads(G, B, A, 1.3)
    Gs = torch.stack([torch.roll(G[i], -i) for i in range(m)])  # Gs[i, d] = G[i, (i + d) mod m]
    assert rel_err(gB, 1.3 * Gs @ A.T) < 1e-12
    assert rel_err(gA, 1.3 * B.T @ Gs) < 1e-12


@pytest.mark.interpreter
def test_shift_direction_matches_authors_gather(gen):
    """The public op vs the authors' formulation torch.gather(P, 1, (j - i) % m) (both backends)."""
    m, r = 23, 2
    B, A = rnd(gen, m, r), rnd(gen, r, m)
    i = torch.arange(m).view(-1, 1)
    j = torch.arange(m).view(1, -1)
    authors = torch.gather(B @ A, 1, (j - i) % m)
    for name in ("torch", "triton"):
        with pefttriton.use_backend(name):
            assert rel_err(shift_product(B, A, 1.0), authors) < 1e-13


def test_shift_product_op_autograd(backend, gen):
    m, r = 45, 3
    B = rnd(gen, m, r).requires_grad_(True)
    A = rnd(gen, r, m).requires_grad_(True)
    M = shift_product(B, A, 0.4)
    M_ref = 0.4 * shift_rows(B @ A)
    assert rel_err(M, M_ref) < 1e-13
    G = rnd(gen, m, m)
    for g, g_ref in zip(torch.autograd.grad(M, (B, A), G), torch.autograd.grad(M_ref, (B, A), G)):
        assert rel_err(g, g_ref) < 1e-12


# ---------------------------------------------------------------------- the LoRMA-pi op


@pytest.mark.parametrize("order", ["tokens", "weight"])
@pytest.mark.parametrize("shape", SHAPES, ids=["13x29x37", "70x19x83"])
@pytest.mark.parametrize("r", [1, 5])
def test_pi_linear_op_against_reference(backend, gen, order, shape, r):
    """Forward and gradients wrt x, weight, bias, A, B, float64, both orders."""
    N, n, m = shape
    t = {
        "x": rnd(gen, 2, N, n),  # leading dims flatten and come back
        "weight": rnd(gen, m, n, scale=n**-0.5),
        "bias": rnd(gen, m),
        "A": rnd(gen, r, m, scale=m**-0.5),
        "B": rnd(gen, m, r),
    }
    for v in t.values():
        v.requires_grad_(True)
    y = lorma_pi_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], scale=0.8, order=order)
    y_ref = ref_layer("pi", t["x"], t["weight"], t["bias"], t["A"], t["B"], 0.8)
    assert y.shape == (2, N, m)
    assert rel_err(y, y_ref) < TOL[torch.float64]
    g = rnd(gen, *y.shape)
    names = list(t)
    grads = torch.autograd.grad(y, [t[k] for k in names], g)
    refs = torch.autograd.grad(y_ref, [t[k] for k in names], g)
    for name, got, want in zip(names, grads, refs):
        assert rel_err(got, want) < TOL[torch.float64], name


@pytest.mark.parametrize("order", ["tokens", "weight"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float16, 6e-3)])
def test_pi_linear_op_low_precision(backend, gen, order, dtype, tol):
    """fp32 factors with a float32 / float16 layer, against the float64 reference."""
    N, n, m, r = 21, 35, 27, 3
    x = rnd(gen, N, n, dtype=dtype).requires_grad_(True)
    W = rnd(gen, m, n, dtype=dtype, scale=n**-0.5)
    b = rnd(gen, m, dtype=dtype)
    A = rnd(gen, r, m, dtype=torch.float32, scale=m**-0.5).requires_grad_(True)
    B = rnd(gen, m, r, dtype=torch.float32).requires_grad_(True)
    y = lorma_pi_linear(x, W, b, A, B, scale=0.5, order=order)
    assert y.dtype == dtype
    refs = [v.detach().double().requires_grad_(True) for v in (x, A, B)]
    y_ref = ref_layer("pi", refs[0], W.double(), b.double(), refs[1], refs[2], 0.5)
    assert rel_err(y, y_ref) < tol
    g = rnd(gen, N, m, dtype=dtype)
    got = torch.autograd.grad(y, (x, A, B), g)
    want = torch.autograd.grad(y_ref, refs, g.double())
    for name, a, e, inp in zip(("x", "A", "B"), got, want, (x, A, B)):
        assert a.dtype == inp.dtype, name
        assert rel_err(a, e) < tol, name


def test_pi_linear_gradcheck(backend):
    """Backward is the derivative of forward, and an undefined output gradient is handled.

    The Triton backend runs in the interpreter, where gradcheck's full mode (two forwards per input
    element) takes about 10 s: it checks a random projection ``v^T J u`` per input instead (fast
    mode), which still fails for any sizeable error; the element-wise check of every gradient, at
    1e-10 against a float64 reference, is test_pi_linear_op_against_reference[triton].
    """
    g = torch.Generator().manual_seed(3)
    N, n, m, r = 4, 5, 6, 2
    shapes = [(N, n), (m, n), (m,), (r, m), (m, r)]
    inputs = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    for order in ("tokens", "weight"):
        fn = lambda *a, o=order: lorma_pi_linear(*a, scale=0.7, order=o)  # noqa: E731
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    y.sum().backward()
    return shapes


def test_pi_saves_little(backend, gen):
    """No (m, m) multiplier is saved; tokens order keeps z (N, m) only when A/B train, weight order
    keeps M W0 (m, n) only when x needs a gradient and x only when A/B train."""
    N, n, m, r = 11, 26, 19, 3
    W, b = rnd(gen, m, n), rnd(gen, m)

    def run(order, x_grad, ab_grad):
        x = rnd(gen, N, n).requires_grad_(x_grad)
        A = rnd(gen, r, m).requires_grad_(ab_grad)
        B = rnd(gen, m, r).requires_grad_(ab_grad)
        return _saved_shapes(lambda: lorma_pi_linear(x, W, b, A, B, scale=1.0, order=order))

    for order in ("tokens", "weight"):
        for x_grad, ab_grad in ((True, True), (True, False), (False, True)):
            shapes = run(order, x_grad, ab_grad)
            assert (m, m) not in shapes, (order, shapes)
            if order == "tokens":
                assert ((N, m) in shapes) == ab_grad, (order, x_grad, ab_grad, shapes)
                assert (N, n) not in shapes, shapes
            else:
                # the frozen weight (m, n) is always saved; M W0 has the same shape
                assert shapes.count((m, n)) == 1 + int(x_grad), (order, x_grad, ab_grad, shapes)
                assert ((N, n) in shapes) == ab_grad, (order, x_grad, ab_grad, shapes)


def test_pi_order_rule():
    """Hand-computed multiply-add counts (m = n = 64, r = 4)."""
    m = n = 64
    # N = 8, training: tokens 3*8*64^2 + 4*4*64^2 = 163840; weight 8*64*64 + 2*64^3 + 3*4*64^2 = 606208.
    assert pi_extra_macs(8, m, n, 4, "tokens", True) == 163840
    assert pi_extra_macs(8, m, n, 4, "weight", True) == 606208
    assert pi_order(8, m, n, True, r=4) == "tokens"
    # N = 1000: tokens 12353536 > weight 4669440.
    assert pi_order(1000, m, n, True, r=4) == "weight"
    # Forward only the rule is N < n.
    assert pi_order(63, m, n, False) == "tokens" and pi_order(65, m, n, False) == "weight"


# ----------------------------------------------------------------------------- the module


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=["13x29x37", "70x19x83"])
@pytest.mark.parametrize("r", [1, 3, 20])
def test_variant_against_reference(backend, gen, variant, shape, r):
    """Module forward and gradients wrt x, A, B vs the float64 reference."""
    N, n, m = shape
    layer = make_layer(gen, n, m, r, variant)
    x = rnd(gen, N, n).requires_grad_(True)
    y = layer(x)
    A = layer.lorma_A.detach().clone().requires_grad_(True)
    B = layer.lorma_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = ref_layer(variant, x_ref, layer.base_layer.weight, layer.base_layer.bias, A, B, layer.scale)
    assert rel_err(y, y_ref) < TOL[torch.float64]
    g = rnd(gen, N, m)
    got = torch.autograd.grad(y, (x, layer.lorma_A, layer.lorma_B), g)
    want = torch.autograd.grad(y_ref, (x_ref, A, B), g)
    for name, a, e in zip(("x", "A", "B"), got, want):
        assert rel_err(a, e) < TOL[torch.float64], name
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_float32_layer(backend, gen, variant):
    n, m, r = 33, 27, 3
    layer = make_layer(gen, n, m, r, variant, dtype=torch.float32)
    assert layer.lorma_A.dtype == layer.lorma_B.dtype == torch.float32
    x = rnd(gen, 3, 5, n, dtype=torch.float32)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (3, 5, m)
    W0, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    y_ref = ref_layer(variant, x.double(), W0, b, layer.lorma_A.double(), layer.lorma_B.double(), layer.scale)
    assert rel_err(y, y_ref) < TOL[torch.float32]


@pytest.mark.parametrize("variant", ["plus", "pi"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_init_multiplier_is_identity(gen, variant, dtype):
    """plus and pi start at T = I (that the layer's output is then the base layer's, on both
    backends, is tests/test_adapter_contract.py::test_fresh_layer_outputs_the_base_layer)."""
    n, m, r = 29, 37, 3
    layer = make_layer(gen, n, m, r, variant, dtype=dtype, randomize=False)
    T = ref_multiplier(variant, layer.lorma_A.double(), layer.lorma_B.double(), layer.scale)
    assert rel_err(T, torch.eye(m, dtype=torch.float64)) < (1e-13 if dtype == torch.float64 else 1e-6)


def test_pi_init_is_authors_init(gen):
    """A = e_0 e_0^T / sqrt(s), B Kaiming with column 0 = 1, / sqrt(s): exactly as in their code."""
    layer = make_layer(gen, 10, 12, 4, "pi", alpha=9.0, randomize=False)
    s = layer.scale
    A, B = layer.lorma_A, layer.lorma_B
    expected_A = torch.zeros(4, 12, dtype=torch.float64)
    expected_A[0, 0] = 1 / math.sqrt(s)
    assert torch.equal(A, expected_A)
    assert torch.allclose(B[:, 0], torch.full((12,), 1 / math.sqrt(s), dtype=torch.float64))
    bound = 1 / math.sqrt(4) / math.sqrt(s)  # kaiming_uniform(a=sqrt(5)) on (m, r): 1 / sqrt(r)
    assert B[:, 1:].abs().max() <= bound and B[:, 1:].std() > 0.2 * bound


def test_plus_init_is_zero_A_kaiming_B(gen):
    layer = make_layer(gen, 10, 12, 4, "plus", randomize=False)
    assert torch.equal(layer.lorma_A, torch.zeros(4, 12, dtype=torch.float64))
    assert layer.lorma_B.abs().max() <= 0.5 and layer.lorma_B.std() > 0.1


def test_naive_init_projects_onto_span_of_B(backend, gen):
    """naive cannot start at W0 (rank <= r): it starts at P_B W0 with P_B the projector onto span(B),
    which equals the base output exactly when W0's columns lie in span(B)."""
    n, m, r = 29, 37, 3
    layer = make_layer(gen, n, m, r, "naive", randomize=False)
    Q, _ = torch.linalg.qr(layer.lorma_B.detach())
    P = Q @ Q.T  # projector onto span(B), computed independently of pinv
    x = rnd(gen, 9, n)
    W0, b = layer.base_layer.weight, layer.base_layer.bias
    assert rel_err(layer(x), x @ (P @ W0).T + b) < 1e-12
    assert rel_err(layer(x), layer.base_layer(x)) > 0.1  # and that is not the base output
    with torch.no_grad():
        W0.copy_(layer.lorma_B.detach() @ rnd(gen, r, n))
    assert rel_err(layer(x), layer.base_layer(x)) < 1e-12


# ----------------------------------------------------------------------- rank inflation


def _random_updates(layer, gen, steps=3, lr=0.05):
    with torch.no_grad():
        for _ in range(steps):
            for p in (layer.lorma_A, layer.lorma_B):
                p.add_(lr * rnd(gen, *p.shape, dtype=p.dtype))


@pytest.mark.parametrize("variant", VARIANTS)
def test_rank_inflation(gen, variant):
    """After three random-direction updates from the init, with T W0 the adapted weight:

    =======  =========  ===============  =======================
    variant  rank(T)    rank(T W0)       rank(dW = T W0 - W0)
    =======  =========  ===============  =======================
    naive    <= r       <= r             full: W0 is gone
    plus     m (full)   min(m, n)        <= r: dW = s B (A W0)
    pi       m (full)   min(m, n)        min(m, n)
    =======  =========  ===============  =======================

    The rank bottleneck that inflation removes is the multiplier's (and so the adapted weight's).
    """
    n, m, r = 53, 37, 3
    layer = make_layer(gen, n, m, r, variant, randomize=False)
    _random_updates(layer, gen)
    A, B, W0 = layer.lorma_A.detach(), layer.lorma_B.detach(), layer.base_layer.weight.detach()
    T = ref_multiplier(variant, A, B, layer.scale)
    dW = T @ W0 - W0
    assert rel_err(layer.delta_weight(), dW) < 1e-12
    rank_T, rank_W, rank_dW = numerical_rank(T), numerical_rank(T @ W0), numerical_rank(dW)
    full = min(m, n)
    if variant == "naive":
        assert rank_T <= r and rank_W <= r and rank_dW == full
    elif variant == "plus":
        assert rank_T == m and rank_W == full and rank_dW <= r
    else:
        assert rank_T == m and rank_W == full and rank_dW == full


# ------------------------------------------------------------------------- merge / unmerge


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_unmerge(gen, variant, dtype):
    n, m, r = 29, 37, 3
    layer = make_layer(gen, n, m, r, variant, dtype=dtype)
    W0 = layer.base_layer.weight.detach().clone()
    x = rnd(gen, 6, n, dtype=dtype)
    y = layer(x).detach()
    T = ref_multiplier(variant, layer.lorma_A.double(), layer.lorma_B.double(), layer.scale)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_err(layer.delta_weight(), T @ W0.double() - W0.double()) < tol
    layer.merge()
    assert layer.merged
    assert rel_err(layer.base_layer.weight, T @ W0.double()) < tol
    assert rel_err(layer(x), y) < tol
    # delta_weight still refers to the original W0 while merged
    assert rel_err(layer.delta_weight(), T @ W0.double() - W0.double()) < tol
    # plus inverts (Woodbury, nothing kept) when T is well conditioned; pi and naive keep W0
    woodbury = variant == "plus" and torch.linalg.cond(T).item() <= 10.0
    assert (layer.base_weight_copy is None) == woodbury
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged and layer.base_weight_copy is None
    if woodbury:
        assert rel_err(layer.base_layer.weight, W0) < 30 * torch.finfo(dtype).eps
    else:
        assert torch.equal(layer.base_layer.weight, W0)
    assert rel_err(layer(x), y) < tol
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plus_unmerge_by_woodbury(gen, dtype):
    """A small update (T near I, as after training): plus keeps no copy and inverts T exactly enough."""
    n, m, r = 29, 37, 3
    layer = make_layer(gen, n, m, r, "plus", dtype=dtype)
    with torch.no_grad():
        layer.lorma_A.mul_(0.05)
    T = ref_multiplier("plus", layer.lorma_A.double(), layer.lorma_B.double(), layer.scale)
    cond = torch.linalg.cond(T).item()
    assert 1.05 < cond < 10.0
    assert abs(layer.plus_multiplier_cond() - cond) < 1e-5 * cond
    W0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.base_weight_copy is None
    assert rel_err(layer.base_layer.weight, T @ W0.double()) < 10 * torch.finfo(dtype).eps
    layer.unmerge()
    assert rel_err(layer.base_layer.weight, W0) < 30 * torch.finfo(dtype).eps


def test_plus_multiplier_cond_against_dense(gen):
    """The O(m r^2) condition number vs torch.linalg.cond of the dense T, including 2r >= m."""
    for m, r in ((37, 3), (6, 4)):
        layer = make_layer(gen, 5, m, r, "plus")
        T = ref_multiplier("plus", layer.lorma_A, layer.lorma_B, layer.scale).detach()
        assert abs(layer.plus_multiplier_cond() - torch.linalg.cond(T).item()) < 1e-9 * torch.linalg.cond(T).item()


def test_merge_unmerge_plus_ill_conditioned_keeps_copy(gen):
    """When I_r + s A B is near singular the Woodbury inverse is unreliable: merge keeps W0."""
    n, m, r = 20, 16, 2
    layer = make_layer(gen, n, m, r, "plus")
    with torch.no_grad():  # s A B = -(1 - 1e-9) I_r, so I_r + s A B = 1e-9 I_r
        layer.lorma_A.copy_(-(1 - 1e-9) * torch.linalg.pinv(layer.lorma_B) / layer.scale)
    W0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.base_weight_copy is not None
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, W0)


def test_unmerge_without_copy_raises_for_pi_and_naive(gen):
    for variant in ("pi", "naive"):
        layer = make_layer(gen, 6, 5, 2, variant)
        layer.merge()
        layer.base_weight_copy = None  # as after loading a merged layer's state_dict into a new module
        with pytest.raises(RuntimeError, match="cannot be restored"):
            layer.unmerge()


def test_merge_unmerge_16bit_keeps_copy(gen):
    layer = make_layer(gen, 20, 16, 2, "plus", dtype=torch.float16)
    assert layer.lorma_A.dtype == torch.float32
    W0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.base_weight_copy is not None
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, W0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 6e-3), (torch.bfloat16, 3e-2)], ids=["fp16", "bf16"])
def test_merge_after_casting_the_whole_layer(backend, gen, variant, dtype, tol):
    """``layer.half()`` / ``.bfloat16()`` casts the factors too (a whole model cast to 16 bits):
    forward, merge, the merged forward and unmerge all work, against float64 references of the
    layer's own 16-bit factors, and unmerge restores W0 bit for bit (16-bit weights keep a copy)."""
    n, m, r = 20, 16, 2
    layer = make_layer(gen, n, m, r, variant, dtype=torch.float32).to(dtype)
    assert layer.lorma_A.dtype == layer.lorma_B.dtype == layer.base_layer.weight.dtype == dtype
    W0, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().double()
    A, B = layer.lorma_A.detach().double(), layer.lorma_B.detach().double()
    T = ref_multiplier(variant, A, B, layer.scale)
    x = rnd(gen, 5, n, dtype=dtype)
    y_ref = ref_layer(variant, x.double(), W0.double(), bias, A, B, layer.scale)
    with torch.no_grad():
        assert rel_err(layer(x), y_ref) < tol
        assert rel_err(layer.delta_weight(), T @ W0.double() - W0.double()) < 1e-5
        layer.merge()
        assert layer.merged and layer.base_layer.weight.dtype == dtype
        assert rel_err(layer.base_layer.weight, T @ W0.double()) < tol  # T W0 rounded once to 16 bits
        assert rel_err(layer(x), y_ref) < tol
        layer.unmerge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, W0)


# ------------------------------------------------------------------------------ validation


def test_constructor_validation():
    """alpha and variant (base layer and rank: tests/test_adapter_contract.py)."""
    base = nn.Linear(4, 5)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="alpha must be a positive finite float"):
            FusedLoRMALinear(base, 2, alpha=bad)
    with pytest.raises(ValueError, match="variant must be one of"):
        FusedLoRMALinear(base, 2, variant="rri")


def test_module_attributes():
    """(Parameters, state_dict and repr: tests/test_adapter_contract.py.)"""
    layer = FusedLoRMALinear(nn.Linear(7, 5), 3, alpha=6.0, variant="pi")
    assert (layer.r, layer.in_features, layer.out_features, layer.scale) == (3, 7, 5, 2.0)


def _pi_args(gen, m=5, n=4, r=2, N=3):
    return rnd(gen, N, n), rnd(gen, m, n), rnd(gen, m), rnd(gen, r, m), rnd(gen, m, r)


def test_pi_linear_validation(gen):
    x, W, b, A, B = _pi_args(gen)
    with pytest.raises(ValueError, match=r"^x must have shape \(\.\.\., 4\)"):
        lorma_pi_linear(rnd(gen, 3, 6), W, b, A, B)
    with pytest.raises(ValueError, match=r"^A must have shape \(2, 5\)"):
        lorma_pi_linear(x, W, b, rnd(gen, 2, 4), B)
    with pytest.raises(ValueError, match=r"^B must have shape \(5, r\)"):
        lorma_pi_linear(x, W, b, A, rnd(gen, 4, 2))
    with pytest.raises(ValueError, match=r"^bias must have shape \(5,\)"):
        lorma_pi_linear(x, W, rnd(gen, 4), A, B)
    with pytest.raises(TypeError, match="^weight must have dtype torch.float64"):
        lorma_pi_linear(x, W.float(), b, A, B)
    with pytest.raises(TypeError, match="^B must have dtype"):
        lorma_pi_linear(x, W, b, A, B.half())
    with pytest.raises(TypeError, match="^A must have dtype torch.float64"):
        lorma_pi_linear(x, W, b, A.float(), B)
    with pytest.raises(TypeError, match="^x must be a torch.Tensor"):
        lorma_pi_linear(x.tolist(), W, b, A, B)
    with pytest.raises(ValueError, match="^order must be one of"):
        lorma_pi_linear(x, W, b, A, B, order="fast")
    with pytest.raises(ValueError, match="^scale must be finite"):
        lorma_pi_linear(x, W, b, A, B, scale=float("inf"))
    with pytest.raises(ValueError, match=r"^A must have shape \(2, 5\)"):
        shift_product(B, rnd(gen, 2, 4))
    with pytest.raises(ValueError, match=r"^B must be a 2-D \(out_features, r\) tensor"):
        shift_product(rnd(gen, 5), A)


def test_forward_requires_layer_dtype(gen):
    layer = make_layer(gen, 6, 5, 2, "pi")
    with pytest.raises(TypeError, match="weight must have dtype torch.float32"):
        layer(rnd(gen, 3, 6, dtype=torch.float32))


def test_extra_macs_signs():
    """plus adds work, naive removes the base GEMM (negative), pi adds at least m^2 min(N, n)."""
    base = nn.Linear(64, 48)
    N = 256
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plus = FusedLoRMALinear(base, 4, variant="plus").extra_macs(N)
        naive = FusedLoRMALinear(base, 4, variant="naive").extra_macs(N)
        pi = FusedLoRMALinear(base, 4, variant="pi").extra_macs(N, training=False)
    assert plus == 2 * 4 * 48 * 64 + 3 * N * 4 * (64 + 48)
    assert naive == plus - 2 * N * 48 * 64 < 0
    assert pi == 48 * 48 * 64 + 4 * 48 * 48  # forward only, N >= n: weight order


@pytest.mark.parametrize("order", ["tokens", "weight"])
def test_custom_ops_pass_opcheck(gen, order):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the custom ops."""
    from pefttriton.ops import lorma_pi as ops

    x, W, b, A, B = _pi_args(gen, m=7, n=5, r=2, N=6)
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    for path in ("lean", ""):  # "" resolves the path when the op runs (what torch.compile passes)
        with pefttriton.use_backend("torch"):
            torch.library.opcheck(ops._pi_linear_fwd, (x, W, b, A, B, 0.5, order, path))
            torch.library.opcheck(ops._shift_product_op, (B, A, 0.5, path))


@pytest.mark.parametrize("order", ["tokens", "weight"])
def test_pi_empty_input(backend, gen, order):
    """No tokens: an empty output and exactly zero gradients for the factors."""
    x, W, b, A, B = _pi_args(gen, m=7, n=5, r=2, N=0)
    A.requires_grad_(True)
    B.requires_grad_(True)
    y = lorma_pi_linear(x, W, b, A, B, scale=0.5, order=order)
    assert y.shape == (0, 7)
    y.sum().backward()
    assert torch.equal(A.grad, torch.zeros_like(A)) and torch.equal(B.grad, torch.zeros_like(B))
