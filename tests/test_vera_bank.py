"""Many VeRA adapters in one batch: ``vera_bank_linear``, ``VeRABank`` and the model-level helpers.

Every row of a mixed batch must equal what its own single-adapter ``FusedVeRALinear`` computes, and
the float64 oracle ``vera_bank_reference``; on both backends (the "triton" one runs the real kernel
in Triton's interpreter, see conftest.py). PEFT VeRA checkpoints load into banks of a tiny Llama
and ``generate`` with mixed ids equals one PEFT run per adapter.
"""

import copy

import pytest
import torch
from helpers import rel_err, tiny_llama, token_ids
from torch import nn

import pefttriton
from pefttriton.ops.vera_bank import vera_bank_linear, vera_bank_reference
from pefttriton.adapters.vera import FusedVeRALinear, VeRAProjections
from pefttriton.integration.vera_bank import (
    VeRABank,
    adapter_ids,
    inject_banks,
    load_into_banks,
    to_banks,
)

# max|a - ref| / max|ref| against the float64 oracle (and between bank and single-adapter layers).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_bank(gen, n, m, r, K, *, dtype=torch.float32, bias=True, seed=3):
    """A VeRABank (base n -> m, rank r) with K random adapters named "a0", "a1", ..."""
    torch.manual_seed(seed)
    base = nn.Linear(n, m, bias=bias, dtype=dtype)
    bank = VeRABank(base, r, projection_seed=seed)
    for k in range(K):
        d = torch.randn(r, generator=gen, dtype=torch.float64)
        b = torch.randn(m, generator=gen, dtype=torch.float64)
        assert bank.add_adapter(f"a{k}", d, b) == k
    return bank


def ids_per_row(ids, x):
    """``ids`` as one id per token row of ``x`` (..., n), expanded here rather than by the op's own
    helper: shape ``x.shape[:-1]`` or (N,) as they are, (batch,) repeated over each sequence, ()
    for every row."""
    lead = x.shape[:-1]
    N = lead.numel()
    if ids.dim() == 0:
        return torch.full((N,), int(ids), dtype=torch.int64)
    if ids.numel() == N:
        return ids.flatten()
    assert ids.dim() == 1 and len(lead) >= 2 and ids.shape[0] == lead[0], (ids.shape, lead)
    return ids.repeat_interleave(N // lead[0])


def oracle(bank, x, ids):
    """``vera_bank_reference`` on float64 copies of the bank's tensors, ids expanded by ``ids_per_row``."""
    A, B = bank.projection_slices()
    base = bank.base_layer
    bias = None if base.bias is None else base.bias.double()
    return vera_bank_reference(x.double(), base.weight.double(), bias, A.double(), B.double(),
                               bank.lambda_d.double(), bank.lambda_b.double(), ids_per_row(ids, x))


def single_layer(bank, k):
    """Adapter ``k`` of ``bank`` as a FusedVeRALinear sharing its base layer and projections."""
    layer = FusedVeRALinear(bank.base_layer, bank.r, projections=bank.projections)
    with torch.no_grad():
        layer.lambda_d.copy_(bank.lambda_d[k])
        layer.lambda_b.copy_(bank.lambda_b[k])
    return layer


def per_row_expected(bank, x, ids_per_row):
    """Each row through its own single-adapter layer (-1: the base layer)."""
    x2 = x.reshape(-1, x.shape[-1])
    out = bank.base_layer(x2).clone()
    for k in ids_per_row.unique().tolist():
        if k >= 0:
            rows = ids_per_row == k
            out[rows] = single_layer(bank, k)(x2[rows])
    return out.reshape(*x.shape[:-1], -1)


# ------------------------------------------------------------------------------ the op and the layer


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("pattern", ["unsorted", "all-equal", "with-base", "all-base"])
def test_mixed_batch_matches_oracle_and_single_layers(backend, gen, dtype, pattern):
    N, n, m, r, K = 37, 70, 45, 20, 6
    bank = make_bank(gen, n, m, r, K, dtype=dtype)
    x = torch.randn(N, n, generator=gen).to(dtype)
    ids = {
        "unsorted": torch.randint(0, K, (N,), generator=gen),
        "all-equal": torch.full((N,), 4),
        "with-base": torch.randint(-1, K, (N,), generator=gen),
        "all-base": torch.full((N,), -1),
    }[pattern]
    pefttriton.ops.backend.record_path(None)
    with torch.no_grad():
        y = bank(x, adapter_ids=ids)
        # One adapter for all rows runs the single-adapter engine (any strategy), -1 for all the base layer.
        paths = {
            "unsorted": ("lean",), "with-base": ("lean",), "all-equal": ("lean", "weight"), "all-base": (None,),
        }[pattern]
        assert pefttriton.last_path() in (("fused", "split") if backend == "triton" and pattern != "all-base" else paths)
        # Ids not read on the host (as under torch.compile): the bank's own path whatever the mix.
        A, B = bank.projection_slices()
        unread = vera_bank_linear(x, bank.base_layer.weight, bank.base_layer.bias, A, B, bank.lambda_d,
                                  bank.lambda_b, ids, check_ids=False)
        assert pefttriton.last_path() in (("fused", "split") if backend == "triton" else ("lean",))
        expected = per_row_expected(bank, x, ids)
    assert rel_err(unread, expected) < TOL[dtype]
    assert y.dtype == dtype and y.shape == (N, m)
    assert rel_err(y, oracle(bank, x, ids)) < TOL[dtype]
    assert rel_err(y, expected) < TOL[dtype]
    if pattern == "all-base":
        torch.testing.assert_close(y, bank.base_layer(x).detach(), rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_split_strategy_triton(gen, dtype):
    """The split path: cuBLAS-style base GEMM, the kernel adds the low-rank path and rounds once."""
    bank = make_bank(gen, 19, 83, 7, 4, dtype=dtype)
    x = torch.randn(3, 13, 19, generator=gen).to(dtype)
    ids = torch.tensor([2, -1, 0])
    with pefttriton.use_backend("triton"), pefttriton.use_strategy("split"), torch.no_grad():
        y = bank(x, adapter_ids=ids)
    assert pefttriton.last_path() == "split"
    assert rel_err(y, oracle(bank, x, ids)) < TOL[dtype]


def test_per_sequence_ids_broadcast_over_tokens(backend, gen):
    """ids (batch,) for x (batch, seq, n), for any seq (1 = a decode step); and ids of shape
    x.shape[:-1] and () and python names/ints through the layer."""
    bank = make_bank(gen, 30, 20, 8, 3)
    ids = torch.tensor([2, -1, 0, 1])
    with torch.no_grad():
        for seq in (5, 1):
            x = torch.randn(4, seq, 30, generator=gen)
            y = bank(x, adapter_ids=ids)
            per_row = ids[:, None].expand(4, seq).reshape(-1)
            assert rel_err(y, per_row_expected(bank, x, per_row)) < TOL[torch.float32]
        x = torch.randn(4, 5, 30, generator=gen)
        per_token = torch.randint(-1, 3, (4, 5), generator=gen)
        assert rel_err(bank(x, adapter_ids=per_token), oracle(bank, x, per_token)) < TOL[torch.float32]
        torch.testing.assert_close(bank(x, adapter_ids="a1"), bank(x, adapter_ids=torch.tensor(1)))
        torch.testing.assert_close(bank(x, adapter_ids=["a2", -1, "a0", 1]), bank(x, adapter_ids=ids))


@pytest.mark.parametrize("K", [1, 1000])
def test_one_and_a_thousand_adapters(backend, gen, K):
    N, n, m, r = 64, 24, 40, 16
    bank = make_bank(gen, n, m, r, K)
    x = torch.randn(N, n, generator=gen)
    ids = torch.randint(-1, K, (N,), generator=gen)
    with torch.no_grad():
        y = bank(x, adapter_ids=ids)
    assert rel_err(y, oracle(bank, x, ids)) < TOL[torch.float32]
    assert rel_err(y, per_row_expected(bank, x, ids)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path_in_row_chunks(gen, monkeypatch, dtype):
    """The PyTorch path adds the low-rank term chunk by chunk of rows: 7 rows per chunk here."""
    from pefttriton.ops import vera_bank as ops

    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 7 * 40)
    bank = make_bank(gen, 24, 40, 8, 5, dtype=dtype)
    x = torch.randn(3, 11, 24, generator=gen).to(dtype)
    ids = torch.randint(-1, 5, (33,), generator=gen)
    with pefttriton.use_backend("torch"), torch.no_grad():
        y = bank(x, adapter_ids=ids)
    assert rel_err(y, oracle(bank, x, ids)) < TOL[dtype]


def test_any_strides(backend, gen):
    """Transposed x and weight, table views with row strides, expanded and strided ids."""
    N, n, m, r, K = 33, 21, 18, 5, 4
    x = torch.randn(n, N, generator=gen, dtype=torch.float64).T
    weight = torch.randn(n, m, generator=gen, dtype=torch.float64).T
    bias = torch.randn(2 * m, generator=gen, dtype=torch.float64)[::2]
    A = torch.randn(r, n, generator=gen, dtype=torch.float64)
    B = torch.randn(r, m, generator=gen, dtype=torch.float64).T
    lambda_d = torch.randn(K, 2 * r, generator=gen, dtype=torch.float64)[:, ::2]
    lambda_b = torch.randn(2 * K, m, generator=gen, dtype=torch.float64)[::2]
    ids = torch.randint(-1, K, (2 * N,), generator=gen)[::2]
    assert not any(t.is_contiguous() for t in (x, weight, bias, B, lambda_d, lambda_b, ids))
    expected = vera_bank_reference(x, weight, bias, A, B, lambda_d, lambda_b, ids)
    with torch.no_grad():
        y = vera_bank_linear(x, weight, bias, A, B, lambda_d, lambda_b, ids)
    assert rel_err(y, expected) < TOL[torch.float64]


def test_fp16_large_h_does_not_overflow(backend, gen):
    """h = d * (x A^T) beyond float16's range (|d| = 3e4) with a small b: the result is finite and
    right (the Triton path scales h by a power of two, the PyTorch path keeps h in float32)."""
    N, n, m, r = 20, 32, 24, 16
    bank = make_bank(gen, n, m, r, 2, dtype=torch.float16)
    with torch.no_grad():
        bank.lambda_d.fill_(3e4)
        bank.lambda_b.mul_(1e-4)
    x = torch.randn(N, n, generator=gen).half()
    ids = torch.randint(-1, 2, (N,), generator=gen)
    A, _ = bank.projection_slices()
    assert (x.float() @ A.float().T * 3e4).abs().max() > 65504  # h itself overflows float16
    with torch.no_grad():
        y = bank(x, adapter_ids=ids)
    assert torch.isfinite(y).all()
    assert rel_err(y, oracle(bank, x, ids)) < TOL[torch.float16]


def test_training_several_adapters_in_one_batch_torch_path(gen):
    """With gradients enabled the torch backend differentiates through the gathers; the triton
    backend refuses clearly."""
    bank = make_bank(gen, 12, 10, 4, 3, dtype=torch.float64)
    bank.lambda_d.requires_grad_(True)
    bank.lambda_b.requires_grad_(True)
    x = torch.randn(2, 7, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([1, -1])
    with pefttriton.use_backend("torch"):
        y = bank(x, adapter_ids=ids)
    grads = torch.autograd.grad(y.square().sum(), (x, bank.lambda_d, bank.lambda_b))
    ref_in = [x.detach().clone().requires_grad_(True), bank.lambda_d.detach().clone().requires_grad_(True),
              bank.lambda_b.detach().clone().requires_grad_(True)]
    A, B = bank.projection_slices()
    y_ref = vera_bank_reference(ref_in[0], bank.base_layer.weight, bank.base_layer.bias, A, B, ref_in[1], ref_in[2],
                                ids_per_row(ids, x))
    ref_grads = torch.autograd.grad(y_ref.square().sum(), ref_in)
    for g, g_ref in zip(grads, ref_grads):
        assert rel_err(g, g_ref) < TOL[torch.float64]
    assert grads[1][[0, 2]].abs().max() == 0  # adapters no row used get no gradient
    with pefttriton.use_backend("triton"), pytest.raises(RuntimeError, match="inference-only"):
        bank(x, adapter_ids=ids)


def test_add_remove_and_ids(gen):
    bank = make_bank(gen, 8, 6, 4, 3)
    assert bank.adapters == {"a0": 0, "a1": 1, "a2": 2} and bank.adapter_id("a2") == 2
    x = torch.randn(5, 8, generator=gen)
    with torch.no_grad():
        before = bank(x, adapter_ids="a2")
        bank.remove_adapter("a1")
        assert bank.adapters == {"a0": 0, "a2": 2} and bank.num_slots == 3
        torch.testing.assert_close(bank(x, adapter_ids="a2"), before)  # ids of others are stable
        torch.testing.assert_close(bank(x, adapter_ids=1), bank(x, adapter_ids=-1))  # a freed slot is zero
        assert bank.add_adapter("new", torch.ones(4), torch.ones(6)) == 1  # reuses the free slot
        bank.remove_adapter("a2")
        assert bank.num_slots == 2  # trailing free slots are dropped
        assert bank.add_adapter("far", torch.ones(4), torch.ones(6), adapter_id=5) == 5
        assert bank.num_slots == 6 and bank.lambda_d.shape == (6, 4) and bank.lambda_b.shape == (6, 6)
    with pytest.raises(ValueError, match="already holds"):
        bank.add_adapter("a0", torch.ones(4), torch.ones(6))
    with pytest.raises(ValueError, match=r"lambda_b must have shape \(6,\)"):
        bank.add_adapter("x", torch.ones(4), torch.ones(7))
    with pytest.raises(ValueError, match="taken by 'a0'"):
        bank.add_adapter("y", torch.ones(4), torch.ones(6), adapter_id=0)
    with pytest.raises(ValueError, match="holds no adapter 'nope'"):
        bank.adapter_id("nope")
    empty = VeRABank(nn.Linear(8, 6), 4)
    with torch.no_grad():
        torch.testing.assert_close(empty(x, adapter_ids=-1), empty.base_layer(x))
        with pytest.raises(ValueError, match=r"\[-1, 0\)"):
            empty(x, adapter_ids=torch.zeros(5, dtype=torch.int64))


def test_state_dict_round_trip(gen):
    """Tables and names travel in the state dict; an empty bank of the same layer takes them."""
    bank = make_bank(gen, 8, 6, 4, 3)
    bank.remove_adapter("a1")
    fresh = VeRABank(copy.deepcopy(bank.base_layer), 4, projection_seed=3)
    fresh.load_state_dict(bank.state_dict())
    assert fresh.adapters == {"a0": 0, "a2": 2} and fresh.num_slots == 3
    x = torch.randn(4, 8, generator=gen)
    ids = torch.tensor([2, 0, -1, 1])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, adapter_ids=ids), bank(x, adapter_ids=ids), rtol=0, atol=0)


def test_state_dict_that_does_not_fit_changes_nothing(gen):
    """load_state_dict with tables of another width or names for another number of slots raises
    and leaves the bank as it was (it used to take the saved height, names and lambda_d first)."""
    bank = make_bank(gen, 8, 6, 4, 2)
    before = copy.deepcopy(bank.state_dict())
    state = make_bank(gen, 8, 6, 4, 4).state_dict()
    state.update({k: v for k, v in before.items() if k.startswith("base_layer.")})  # only the bank's own part differs
    narrow = dict(state, lambda_b=state["lambda_b"][:, :3])
    names = torch.tensor(list(b'["x", null, "y"]'), dtype=torch.uint8)  # 3 names for 4 slots
    for bad, pattern in ((narrow, "lambda_b"), (dict(state, _extra_state=names), "names of 4 slots")):
        with pytest.raises(RuntimeError, match=pattern):
            bank.load_state_dict(bad)
        after = bank.state_dict()
        assert bank.adapters == {"a0": 0, "a1": 1} and bank.num_slots == 2
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_bad_inputs(gen):
    bank = make_bank(gen, 8, 6, 4, 3)
    x = torch.randn(2, 5, 8, generator=gen)
    A, B = bank.projection_slices()
    W, bias, D, Bt = bank.base_layer.weight, bank.base_layer.bias, bank.lambda_d, bank.lambda_b
    with torch.no_grad():
        with pytest.raises(TypeError, match="adapter_ids must have an integer dtype"):
            vera_bank_linear(x, W, bias, A, B, D, Bt, torch.zeros(2))
        with pytest.raises(TypeError, match="adapter_ids must be a torch.Tensor"):
            vera_bank_linear(x, W, bias, A, B, D, Bt, [0, 1])
        with pytest.raises(ValueError, match=r"must lie in \[-1, 3\).*from -1 to 3"):
            vera_bank_linear(x, W, bias, A, B, D, Bt, torch.tensor([-1, 3]))
        with pytest.raises(ValueError, match=r"must lie in \[-1, 3\).*from -2"):
            vera_bank_linear(x, W, bias, A, B, D, Bt, torch.tensor([-2, 0]))
        with pytest.raises(ValueError, match=r"adapter_ids must have shape \(2, 5\).*\(10,\).*\(2,\).*got \(3,\)"):
            vera_bank_linear(x, W, bias, A, B, D, Bt, torch.tensor([0, 1, 2]))
        with pytest.raises(ValueError, match=r"lambda_b must have shape \(3, 6\)"):
            vera_bank_linear(x, W, bias, A, B, D, Bt[:2], torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"lambda_d must be a \(num_adapters, r\)"):
            vera_bank_linear(x, W, bias, A, B, D[0], Bt, torch.tensor([0, 1]))
        with pytest.raises(TypeError, match="lambda_d must have dtype"):
            vera_bank_linear(x, W, bias, A, B, D.to(torch.float16), Bt, torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"B must have shape \(6, 4\)"):
            vera_bank_linear(x, W, bias, A, B.T, D, Bt, torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="no adapter ids for this VeRABank"):
            bank(x)
        with pytest.raises(ValueError, match=r"outside \[-1, 3\)"):
            bank(x, adapter_ids=[0, 7])
        with pytest.raises(ValueError, match="holds no adapter 'zzz'"):
            bank(x, adapter_ids=["zzz", 0])
        with pytest.raises(TypeError, match="ints or adapter names"):
            bank(x, adapter_ids=[0.5, 0])


@pytest.mark.parametrize("path", ["lean", "fused", "split"])
def test_custom_op_registration(gen, path):
    """The custom op's schema, fake implementation (what torch.compile traces) and dispatch agree."""
    from pefttriton.ops import vera_bank as ops

    bank = make_bank(gen, 8, 6, 4, 3)
    A, B = bank.projection_slices()
    x = torch.randn(2, 5, 8, generator=gen)
    ids = torch.randint(-1, 3, (10,), generator=gen)
    args = (x, bank.base_layer.weight.detach(), bank.base_layer.bias.detach(), A, B, bank.lambda_d, bank.lambda_b, ids, path)
    torch.library.opcheck(ops._vera_bank_linear, args)


# ------------------------------------------------------------------------------ id dtypes, ranges, changes


SMALL_ID_DTYPES = [torch.int8, torch.int16, torch.uint8, torch.int32, torch.int64]


@pytest.mark.parametrize("id_dtype", SMALL_ID_DTYPES, ids=lambda dt: str(dt).removeprefix("torch."))
def test_every_integer_id_dtype(backend, gen, id_dtype):
    """Ids of any accepted integer dtype select the same adapters as int64 ones, through the op, the
    layer, an adapter_ids block and (torch backend) the differentiable path. K == N: indexing a
    table with a uint8 tensor treats it as a boolean mask, which then fits the table and picks
    other rows without any error."""
    N = K = 6
    bank = make_bank(gen, 8, 5, 4, K)
    x = torch.randn(N, 8, generator=gen)
    # no id 0 for uint8: as a mask of six True values it would give row t adapter t, silently
    signed = [5, -1, 3, 3, 1, 2] if id_dtype != torch.uint8 else [5, 2, 3, 3, 1, 4]
    ids = torch.tensor(signed).to(id_dtype)
    expected = oracle(bank, x, torch.tensor(signed))
    A, B = bank.projection_slices()
    with torch.no_grad():
        y = vera_bank_linear(x, bank.base_layer.weight, bank.base_layer.bias, A, B, bank.lambda_d,
                             bank.lambda_b, ids)
        assert rel_err(y, expected) < TOL[torch.float32]
        assert rel_err(bank(x, adapter_ids=ids), expected) < TOL[torch.float32]
        model = nn.Sequential(bank)
        with adapter_ids(model, ids):
            assert rel_err(model(x), expected) < TOL[torch.float32]
        one = torch.tensor(3).to(id_dtype)  # all rows one adapter: the single-adapter engine
        assert rel_err(bank(x, adapter_ids=one), oracle(bank, x, torch.full((N,), 3))) < TOL[torch.float32]
    if backend == "torch":  # with a gradient: the plain PyTorch path, which gathers with the ids
        xg = x.clone().requires_grad_(True)
        y = bank(xg, adapter_ids=ids)
        assert rel_err(y, expected) < TOL[torch.float32]
        (grad,) = torch.autograd.grad(y.sum(), xg)
        ref_x = x.double().requires_grad_(True)
        (ref_grad,) = torch.autograd.grad(oracle(bank, ref_x, torch.tensor(signed)).sum(), ref_x)
        assert rel_err(grad, ref_grad) < TOL[torch.float32]


@pytest.mark.parametrize("id_dtype", [torch.uint16, torch.uint32, torch.uint64, torch.bool],
                         ids=lambda dt: str(dt).removeprefix("torch."))
def test_unsupported_id_dtypes_refused(gen, id_dtype):
    """Unsigned 16/32/64-bit ids (barely supported by PyTorch; uint64 above 2**63 - 1 would wrap to
    negative ids) and bool are refused with an error naming adapter_ids, everywhere ids enter."""
    bank = make_bank(gen, 8, 5, 4, 3)
    x = torch.randn(2, 8, generator=gen)
    ids = torch.tensor([1, 0]).to(id_dtype)
    A, B = bank.projection_slices()
    with torch.no_grad():
        with pytest.raises(TypeError, match=r"adapter_ids must have an integer dtype.*int8 or uint8.*got torch\.%s"
                           % str(id_dtype).removeprefix("torch.")):
            vera_bank_linear(x, bank.base_layer.weight, bank.base_layer.bias, A, B, bank.lambda_d, bank.lambda_b, ids)
        with pytest.raises(TypeError, match="adapter_ids must have an integer dtype"):
            bank(x, adapter_ids=ids)
        with pytest.raises(TypeError, match="adapter_ids must have an integer dtype"):
            with adapter_ids(nn.Sequential(bank), ids):
                pass


def test_id_range_is_not_public(gen):
    """``id_range`` cannot be checked without reading the ids, which is what it would spare: it is
    not part of vera_bank_linear (a wrong one routed every row of a mixed batch through one adapter
    without a word). The bank's private entry, which gets it from an adapter_ids block, checks its
    form and bounds."""
    from pefttriton.ops import vera_bank as ops

    bank = make_bank(gen, 8, 5, 4, 3)
    x = torch.randn(4, 8, generator=gen)
    ids = torch.tensor([0, 2, 1, 0])
    A, B = bank.projection_slices()
    args = (x, bank.base_layer.weight, bank.base_layer.bias, A, B, bank.lambda_d, bank.lambda_b, ids)
    with torch.no_grad():
        with pytest.raises(TypeError, match="id_range"):
            vera_bank_linear(*args, id_range=(0, 0))
        torch.testing.assert_close(ops._vera_bank_in_range(*args, id_range=(0, 2)), oracle(bank, x, ids).float())
        for bad, error, pattern in (
            ((5, 5), ValueError, r"id_range must lie in \[-1, 3\).*\(5, 5\)"),
            ((2, 0), ValueError, r"smallest <= largest.*\(2, 0\)"),
            ((-2, 0), ValueError, r"id_range must lie in \[-1, 3\)"),
            ([0, 2], TypeError, r"id_range must be a tuple of two ints"),
            ((0, 2.0), TypeError, r"id_range must be a tuple of two ints"),
            ((True, 2), TypeError, r"id_range must be a tuple of two ints"),
        ):
            with pytest.raises(error, match=pattern):
                ops._vera_bank_in_range(*args, id_range=bad)


def test_adapters_changed_inside_an_ids_block(gen):
    """An adapter removed or replaced inside an adapter_ids block that selects it: the next forward
    raises naming it (it used to die with an IndexError, or silently compute the base layer or
    another adapter for those rows); rows that do not use it run on, correctly."""
    x = torch.randn(3, 8, generator=gen)
    with torch.no_grad():
        bank = make_bank(gen, 8, 6, 4, 3)
        model = nn.Sequential(bank)
        with adapter_ids(model, ["a0", "a2", -1]):  # the trailing slot: the tables shrink
            bank.remove_adapter("a2")
            with pytest.raises(ValueError, match=r"adapter 'a2' \(id 2\) was removed.*adapter_ids"):
                model(x)
        bank = make_bank(gen, 8, 6, 4, 3)
        model = nn.Sequential(bank)
        with adapter_ids(model, torch.tensor([1, 0, 1])):  # a slot in the middle: zeroed, then reused
            bank.remove_adapter("a1")
            with pytest.raises(ValueError, match=r"adapter 'a1' \(id 1\) was removed"):
                model(x)
            bank.add_adapter("other", torch.ones(4), torch.ones(6))
            assert bank.adapter_id("other") == 1
            with pytest.raises(ValueError, match=r"id 1 selected 'a1'.*now holds 'other'"):
                model(x)
        bank = make_bank(gen, 8, 6, 4, 3)
        model = nn.Sequential(bank)
        ids = torch.tensor([0, -1, 2])
        with adapter_ids(model, ids):
            bank.remove_adapter("a1")  # not used by these rows
            assert rel_err(model(x), oracle(bank, x, ids)) < TOL[torch.float32]
            before = model(x)
            d, b = bank.lambda_d[2].clone(), 2 * bank.lambda_b[2]
            bank.remove_adapter("a2")  # replaced under the same name and id (load_into_banks(replace=True))
            bank.add_adapter("a2", d, b, adapter_id=2)
            after = model(x)
            assert rel_err(after, oracle(bank, x, ids)) < TOL[torch.float32]
            assert not torch.allclose(after[2], before[2]) and torch.equal(after[:2], before[:2])


# ------------------------------------------------------------------------------ models


def _peft_vera(base, gen, tmp_path, name, seed=7, targets=("q_proj", "v_proj")):
    """A PEFT VeRA adapter with random lambdas on ``base`` (modified), saved to ``tmp_path / name``."""
    from peft import VeraConfig, get_peft_model

    cfg = VeraConfig(r=8, target_modules=list(targets), projection_prng_key=seed, save_projection=True)
    peft_model = get_peft_model(base, cfg).eval()
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "vera_lambda" in pname:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    peft_model.save_pretrained(tmp_path / name)
    return peft_model


def _generate(model, ids):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                          do_sample=False, pad_token_id=0)


def test_peft_checkpoints_into_banks_generate_mixed(tmp_path, gen, backend):
    """Two PEFT VeRA checkpoints in the banks of a tiny Llama; a batch mixing them and the base
    model generates, token for token, what one PEFT model per adapter generates."""
    peft_a = _peft_vera(tiny_llama(), gen, tmp_path, "a")
    peft_b = _peft_vera(tiny_llama(), gen, tmp_path, "b")
    model = inject_banks(tiny_llama(), ["q_proj", "v_proj"], r=8, projection_seed=7)
    assert load_into_banks(model, "a", tmp_path / "a") == 0
    assert load_into_banks(model, "b", tmp_path / "b") == 1
    prompts = token_ids(gen, batch=4, length=6)
    names = ["b", "a", -1, "a"]
    with torch.no_grad():
        with adapter_ids(model, names):
            logits = model(prompts).logits
            tokens = _generate(model, prompts)
        ref_models = {"a": peft_a, "b": peft_b, -1: tiny_llama()}
        with pefttriton.use_backend("torch"):  # PEFT's own layers: no pefttriton code runs anyway
            refs = {k: (m(prompts).logits, _generate(m, prompts)) for k, m in ref_models.items()}
    for row, k in enumerate(names):
        assert rel_err(logits[row], refs[k][0][row]) < 1e-5
        assert torch.equal(tokens[row], refs[k][1][row])


def test_beam_search_repeats_each_sequence_id(tmp_path, gen):
    """generate with num_beams=2 runs 2 rows per sequence: each sequence's id covers both."""
    peft_a = _peft_vera(tiny_llama(), gen, tmp_path, "a")
    model = inject_banks(tiny_llama(), ["q_proj", "v_proj"], r=8, projection_seed=7)
    load_into_banks(model, "a", tmp_path / "a")
    prompts = token_ids(gen, batch=2, length=5)
    kw = {"attention_mask": torch.ones_like(prompts), "max_new_tokens": 3, "min_new_tokens": 3, "num_beams": 2,
          "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        with adapter_ids(model, ["a", -1]):
            tokens = model.generate(input_ids=prompts, **kw)
        expected_a = peft_a.generate(input_ids=prompts, **kw)
        expected_base = tiny_llama().generate(input_ids=prompts, **kw)
    assert torch.equal(tokens[0], expected_a[0]) and torch.equal(tokens[1], expected_base[1])


def test_pefttriton_checkpoints_and_to_banks(tmp_path, gen):
    """``to_banks`` keeps an injected VeRA model's adapter; a ``save_adapter`` file loads beside it."""
    from helpers import randomize_adapters

    def adapted(seed):
        model = tiny_llama()
        pefttriton.inject(model, pefttriton.VeRAConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], projection_seed=5))
        randomize_adapters(model, torch.Generator().manual_seed(seed))
        return model.eval()

    first, second = adapted(1), adapted(2)
    pefttriton.save_adapter(second, tmp_path / "second.safetensors")
    prompts = token_ids(gen, batch=3, length=5)
    with torch.no_grad():
        expected = {"first": first(prompts).logits, "second": second(prompts).logits, -1: tiny_llama()(prompts).logits}
        banks = to_banks(copy.deepcopy(first), adapter_name="first")
        assert load_into_banks(banks, "second", tmp_path / "second.safetensors") == 1
        names = ["second", -1, "first"]
        with adapter_ids(banks, names):
            logits = banks(prompts).logits
    for row, k in enumerate(names):
        assert rel_err(logits[row], expected[k][row]) < 1e-5


def test_load_into_banks_errors(tmp_path, gen):
    _peft_vera(tiny_llama(), gen, tmp_path, "seed9", seed=9)
    _peft_vera(tiny_llama(), gen, tmp_path, "qonly", targets=("q_proj",))
    _peft_vera(tiny_llama(), gen, tmp_path, "ok")
    model = inject_banks(tiny_llama(), ["q_proj", "v_proj"], r=8, projection_seed=7)
    with pytest.raises(ValueError, match=r"\(seed, r, max_in, max_out\) = \(7, 8, 30, 30\), the checkpoint's \(9, 8, 30, 30\)"):
        load_into_banks(model, "x", tmp_path / "seed9")
    wider = inject_banks(tiny_llama(), ["q_proj", "v_proj", "up_proj"], r=8, projection_seed=7)  # max_out 45
    with pytest.raises(ValueError, match=r"\(7, 8, 30, 45\), the checkpoint's \(7, 8, 30, 30\): build the banks"):
        load_into_banks(wider, "x", tmp_path / "ok")
    v_only = inject_banks(tiny_llama(), ["v_proj"], r=8, projection_seed=7)
    with pytest.raises(ValueError, match="adapts .*q_proj.*which are not VeRA banks"):
        load_into_banks(v_only, "x", tmp_path / "ok")
    with pytest.raises(FileNotFoundError):
        load_into_banks(model, "x", tmp_path / "missing")
    load_into_banks(model, "q", tmp_path / "qonly")  # same projections (v_proj is smaller): v banks get zeros
    assert load_into_banks(model, "ok", tmp_path / "ok") == 1
    with pytest.raises(ValueError, match="already hold an adapter 'ok'"):
        load_into_banks(model, "ok", tmp_path / "ok")
    assert load_into_banks(model, "ok", tmp_path / "ok", replace=True) == 1
    with pytest.raises(ValueError, match=r"must lie in \[-1, 2\)"), adapter_ids(model, torch.tensor([0, 2])):
        pass
    with pytest.raises(ValueError, match="no VeRABank"):
        load_into_banks(tiny_llama(), "x", tmp_path / "ok")
    other = nn.Sequential(nn.Linear(4, 4))
    other[0] = VeRABank(other[0], 2, projections=VeRAProjections(2, 4, 4, seed=1))
    with pytest.raises(ValueError, match="not VeRA banks of the model"):
        load_into_banks(other, "x", tmp_path / "ok")


def test_load_into_banks_unreadable_files(tmp_path, gen):
    """A file that is not safetensors (or is cut short), as a pefttriton file or inside a PEFT
    directory: ValueError naming the file and saying why; the banks are unchanged."""
    import shutil

    _peft_vera(tiny_llama(), gen, tmp_path, "ok")
    model = inject_banks(tiny_llama(), ["q_proj", "v_proj"], r=8, projection_seed=7)
    load_into_banks(model, "first", tmp_path / "ok")
    before = copy.deepcopy(model.state_dict())
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    weights = (tmp_path / "ok" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(weights[: len(weights) // 2])
    shutil.copytree(tmp_path / "ok", tmp_path / "cut_peft")
    (tmp_path / "cut_peft" / "adapter_model.safetensors").write_bytes(weights[:-7])
    shutil.copytree(tmp_path / "ok", tmp_path / "bad_config")
    (tmp_path / "bad_config" / "adapter_config.json").write_text("{not json")
    for path, pattern in (
        (tmp_path / "text.safetensors", r"text\.safetensors is not a readable safetensors file"),
        (tmp_path / "cut.safetensors", r"cut\.safetensors is not a readable safetensors file"),
        (tmp_path / "cut_peft", r"cut_peft/adapter_model\.safetensors is not a readable safetensors file"),
        (tmp_path / "bad_config", r"bad_config/adapter_config\.json is not valid JSON"),
    ):
        with pytest.raises(ValueError, match=pattern):
            load_into_banks(model, "second", path)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_load_into_banks_replace_fails_before_any_change(tmp_path, gen):
    """replace=True with a file whose vectors cannot go into a bank (integer lambda_b in its last
    layer): the error comes before the old adapter is removed from any bank."""
    import shutil

    from safetensors.torch import load_file, save_file

    _peft_vera(tiny_llama(), gen, tmp_path, "ok")
    model = inject_banks(tiny_llama(), ["q_proj", "v_proj"], r=8, projection_seed=7)
    load_into_banks(model, "a", tmp_path / "ok")
    before = copy.deepcopy(model.state_dict())
    shutil.copytree(tmp_path / "ok", tmp_path / "int")
    weights = tmp_path / "int" / "adapter_model.safetensors"
    state = load_file(weights)
    key = max(k for k in state if k.endswith("vera_lambda_b"))
    state[key] = state[key].round().to(torch.int32)
    save_file(state, str(weights))
    with pytest.raises(TypeError, match=r"layer .*v_proj.* holds lambda_d torch\.float32 and lambda_b torch\.int32"):
        load_into_banks(model, "a", tmp_path / "int", replace=True)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# ------------------------------------------------------------------------------ README

def _readme_example() -> str:
    """The README's "Serving many VeRA adapters" block, as written there."""
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(encoding="utf-8"), re.DOTALL)
    return next(b for b in blocks if "inject_banks(model" in b)


def test_readme_example_runs(tmp_path, gen, monkeypatch):
    """The README's "Serving many VeRA adapters" example runs as written."""
    _peft_vera(tiny_llama(), gen, tmp_path, "support_vera")
    legal = _peft_vera(tiny_llama(), gen, tmp_path, "legal_peft")
    plain = pefttriton.from_peft_model(legal)
    pefttriton.save_adapter(plain, tmp_path / "legal.safetensors")
    monkeypatch.chdir(tmp_path)
    prompts = token_ids(gen, batch=3, length=5)
    namespace = {"model": tiny_llama(), "input_ids": prompts}
    exec(compile(_readme_example(), "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    out = namespace["out"]
    assert out.shape[0] == 3 and torch.equal(out[:, :5], prompts)
    assert namespace["model"].model.layers[0].self_attn.q_proj.adapters == {"support": 0, "legal": 1}
