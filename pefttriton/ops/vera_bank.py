"""``vera_bank_linear``: many VeRA adapters sharing one ``A``, ``B``, mixed row by row in one batch.

    y[t] = x[t] W^T + bias + b[id_t] * ((d[id_t] * (x[t] A^T)) B^T),   id_t = adapter_ids[t]

``d`` (adapters, r) and ``b`` (adapters, m) are tables of the adapters' ``lambda_d`` and
``lambda_b``; id ``-1`` selects the base layer alone. Because VeRA's ``A`` and ``B`` are shared, a
row needs only its own two vectors: the cost is that of one adapter whatever the number of adapters
and however the rows mix.

Paths (:mod:`pefttriton.ops.backend` chooses, as for :func:`~pefttriton.ops.lowrank_linear`):

* ``fused`` (Triton): ``x A^T`` by the engine's GEMM kernel, ``h = d[ids] * (x A^T)`` gathered in
  PyTorch (tokens x rank), then ``pefttriton.kernels.vera_bank``'s one GEMM kernel: the rank segment,
  the accumulator times the gathered ``b`` rows, the base segment, bias; ``y`` rounded once.
* ``split`` (Triton): the base GEMM in cuBLAS (float32 output for 16-bit inputs), the same kernel adds
  the low-rank path and rounds once.
* ``lean`` (PyTorch; ``weight`` is not possible with per-row adapters and runs ``lean``): ``h`` as
  above, then per chunk of rows ``y = bias + (h B^T) * b[ids]`` and ``y += x W^T`` by the GEMM
  itself. 16-bit inputs accumulate base and adapter in float32 and round once.

A batch whose ids are known to be all equal runs the single-adapter engine instead
(:func:`~pefttriton.ops.lowrank_linear` with that adapter's vectors, any of its strategies), or the
base layer for -1: then it costs exactly one adapter.

Inference first: the op is a ``torch.library.custom_op`` without autograd. When a gradient is
needed (training several adapters in one batch), the function runs the same math as plain
differentiable PyTorch ops (autograd through the gathers, float32 accumulation), unless the
``triton`` backend was asked for explicitly, which raises.
"""

import math

import torch
from torch import Tensor

from pefttriton.ops.backend import get_backend, record_path, resolve_path, uses_triton
from pefttriton.kernels import lowrank_linear as engine
from pefttriton.kernels import vera_bank as kernels
from pefttriton.kernels.launch import acc_dtype
from pefttriton.ops.lowrank_linear import lowrank_linear, mm_acc, time_path
from pefttriton.ops.validation import (
    autocast_cast,
    autocast_dtype,
    check_adapter,
    check_tensor,
    check_x_and_weight,
    flatten_tokens,
    no_autocast,
)

# The dtypes adapter ids may have. int32 and int64 are used as they are; int8, int16 and uint8 are
# widened to int64 (exactly) when checked: index_select takes only int32 / int64 indices, and
# indexing with a uint8 tensor would mean a boolean mask (with K == N every row silently takes
# another adapter). PyTorch's unsigned 16/32/64-bit types are refused: few ops support them, and
# uint64 ids above 2**63 - 1 would wrap to negative ids on the way to int64.
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_INDEX_DTYPES = (torch.int64, torch.int32)

# Rows per chunk of the PyTorch path: about this many (rows, out) elements at a time (16 MiB in
# float32), which bounds the temporaries (the gathered b rows, the low-rank product) for long batches.
# Measured on the CPU (2 threads, fp32, N=4096, 1024x1024, r=256, 64 adapters), wall time over one
# adapter's activation-side forward (strategy lean), interleaved: one chunk (2**22) 1.04-1.16x on an
# idle machine and 1.02-1.13x on one shared with other jobs; 2**19-element chunks 1.00-1.04x idle
# but 1.7-1.8x shared (every chunk adds parallel regions that wait for a preempted thread).
_CHUNK_ELEMENTS = 1 << 22

# float16 holds |h| < 65504: above 2**15, h is divided by a power of two (exact) that the kernel
# multiplies back in float32.
_FP16_H_LIMIT = 2.0**15


# ------------------------------------------------------------------------------ adapter ids


def expand_adapter_ids(adapter_ids, lead: tuple[int, ...]) -> Tensor:
    """``adapter_ids`` as one id per token row, shape (N,) with ``N = prod(lead)``.

    Accepted shapes, for ``x`` of shape ``(*lead, n)``: ``lead`` itself (one id per token), ``(N,)``
    (the flattened rows), ``(lead[0],)`` (one id per sequence, broadcast over the other dimensions:
    ``(batch,)`` for ``x`` of shape (batch, seq, n), whatever ``seq``), or a 0-d tensor (every row).
    """
    N = math.prod(lead)
    if adapter_ids.dim() == 0:
        return adapter_ids.reshape(1).expand(N)
    if tuple(adapter_ids.shape) == tuple(lead) or (adapter_ids.dim() == 1 and adapter_ids.numel() == N):
        return adapter_ids.reshape(N)
    if adapter_ids.dim() == 1 and len(lead) >= 2 and adapter_ids.shape[0] == lead[0]:
        return adapter_ids[:, None].expand(lead[0], N // max(lead[0], 1)).reshape(N)
    shapes = [f"{tuple(lead)} (one per token)", f"({N},) (the flattened tokens)"]
    if len(lead) >= 2:
        shapes.append(f"({lead[0]},) (one per sequence)")
    raise ValueError(
        f"adapter_ids must have shape {', '.join(shapes)} or () for x of shape ({', '.join(map(str, lead))}, n); "
        f"got {tuple(adapter_ids.shape)}"
    )


def adapter_id_range(adapter_ids: Tensor) -> tuple[int, int] | None:
    """``(smallest, largest)`` id (a device-to-host copy on CUDA), None for no ids."""
    if adapter_ids.numel() == 0:
        return None
    low, high = torch.aminmax(adapter_ids.reshape(-1).to(torch.int64))
    return int(low), int(high)


def index_ids(adapter_ids) -> Tensor:
    """``adapter_ids`` checked to be a tensor of one of ``INTEGER_DTYPES``, as int32 or int64 (int8,
    int16 and uint8 ids are widened to int64, a copy); TypeError naming ``adapter_ids`` otherwise."""
    if not isinstance(adapter_ids, Tensor):
        raise TypeError(f"adapter_ids must be a torch.Tensor of integer ids, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype not in INTEGER_DTYPES:
        unsigned = adapter_ids.dtype in (torch.uint16, torch.uint32, torch.uint64)
        raise TypeError(
            f"adapter_ids must have an integer dtype (int64, int32, int16, int8 or uint8), got {adapter_ids.dtype}"
            + ("; convert unsigned 16/32/64-bit ids to int64" if unsigned else "")
        )
    if adapter_ids.dtype not in _INDEX_DTYPES:
        adapter_ids = adapter_ids.to(torch.int64)
    return adapter_ids


def check_adapter_ids(
    adapter_ids, x: Tensor, num_adapters: int, *, check_values: bool = True
) -> tuple[Tensor, tuple[int, int] | None]:
    """Validate ``adapter_ids`` against ``x`` (..., n) and a table of ``num_adapters`` rows; returns
    them as (N,) int32 / int64 (:func:`index_ids`), one id per token row
    (:func:`expand_adapter_ids`), and their range (None when not read).

    ``check_values`` reads the smallest and largest id (:func:`adapter_id_range`; skipped under
    ``torch.compile``); callers that validated the same ids already pass False.
    """
    adapter_ids = index_ids(adapter_ids)
    if adapter_ids.device != x.device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device} but x is on {x.device}; put all inputs on one device")
    ids = expand_adapter_ids(adapter_ids, tuple(x.shape[:-1]))
    if not check_values or torch.compiler.is_compiling():
        return ids, None
    id_range = adapter_id_range(ids)
    if id_range is not None and (id_range[0] < -1 or id_range[1] >= num_adapters):
        raise ValueError(
            f"adapter_ids must lie in [-1, {num_adapters}) (-1: the base layer alone; the bank holds "
            f"{num_adapters} adapters), got values from {id_range[0]} to {id_range[1]}"
        )
    return ids, id_range


# ------------------------------------------------------------------------------ the paths


def _gathered_h(xa: Tensor, lambda_d: Tensor, ids: Tensor) -> Tensor:
    """``d[ids] * xa`` in ``xa``'s dtype, rows of id -1 zero; overwrites ``xa``."""
    rows = ids.clamp(min=0)
    xa.mul_(lambda_d.index_select(0, rows).to(xa.dtype))
    return xa.mul_((ids >= 0).to(xa.dtype)[:, None])


def _chunk_rows(m: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(m, 1))


def _lean_forward(x, weight, bias, A, B, lambda_d, lambda_b, ids, out):
    """Writes ``y`` into ``out`` (N, m) with BLAS products and gathers of table rows.

    ``h = d[ids] * (x A^T)`` (zero rows for id -1) once; then per chunk of rows, in float32 /
    float64, ``y = h B^T`` straight into ``out``, ``y = bias + y * b[ids]`` (one elementwise pass),
    ``y += x W^T`` by the GEMM itself (``addmm_``): beyond one adapter's forward the adapter costs
    two gathers and one pass over ``y``. In 16 bits base and adapter are summed in float32 and
    ``y`` is rounded once.
    """
    dtype, acc = x.dtype, acc_dtype(x.dtype)
    h = _gathered_h(mm_acc(x, A.T), lambda_d, ids)
    rows = ids.clamp(min=0)
    B_t = B.to(acc).T
    bias_ = None if bias is None else bias.to(acc)
    y32 = None
    if dtype != acc:  # float32 base: the adapter is added before the one rounding to 16 bits
        y32 = mm_acc(x, weight.T)
        if bias_ is not None:
            y32.add_(bias_)
    step = _chunk_rows(out.shape[1])
    for start in range(0, x.shape[0], step):
        chunk = slice(start, start + step)
        b_rows = lambda_b.index_select(0, rows[chunk]).to(acc)
        if y32 is not None:
            y32[chunk].addcmul_(h[chunk] @ B_t, b_rows)
            continue
        y = out[chunk]
        torch.mm(h[chunk], B_t, out=y)
        if bias_ is not None:
            torch.addcmul(bias_, y, b_rows, out=y)
        else:
            y.mul_(b_rows)
        y.addmm_(x[chunk], weight.T)
    if y32 is not None:
        out.copy_(y32)


def _h_scale(h: Tensor) -> Tensor:
    """A power of two ``s >= 1`` (one-element float32 tensor) with ``max|h| / s <= 2**15``, computed
    on the device (no host sync)."""
    amax = h.abs().amax().reshape(1).to(torch.float32)
    exponent = torch.ceil(torch.log2(amax / _FP16_H_LIMIT)).clamp_(0.0, 100.0)
    return torch.nan_to_num(torch.exp2(exponent), nan=1.0)


def _triton_forward(x, weight, bias, A, B, lambda_d, lambda_b, ids, out, split):
    dtype, acc = x.dtype, acc_dtype(x.dtype)
    h = _gathered_h(engine.fused_gemm(x, A, out_dtype=acc), lambda_d, ids)
    h_scale = None
    if dtype == torch.float16:
        h_scale = _h_scale(h)
        h.div_(h_scale)
    h = h.to(dtype)
    if not split:
        kernels.vera_bank_gemm(x, weight, bias, h, B, lambda_b, ids, out, h_scale)
    else:
        base = mm_acc(x, weight.T)  # float32 for 16-bit inputs: the kernel rounds once
        kernels.vera_bank_gemm(None, None, bias, h, B, lambda_b, ids, out, h_scale, base=base)


def _differentiable(x, weight, bias, A, B, lambda_d, lambda_b, ids):
    """The same math in plain PyTorch ops, for autograd (float32 accumulation, rounded once)."""
    dtype, acc = x.dtype, acc_dtype(x.dtype)
    m, n = weight.shape
    x2 = flatten_tokens(x, n).to(acc)
    rows = ids.clamp(min=0)
    h = (x2 @ A.to(acc).T) * lambda_d.to(acc)[rows] * (ids >= 0).to(acc)[:, None]
    y = torch.nn.functional.linear(x2, weight.to(acc), None if bias is None else bias.to(acc))
    y = y + (h @ B.to(acc).T) * lambda_b.to(acc)[rows]
    return y.to(dtype).reshape(*x.shape[:-1], m)


def _run_path(path: str, x: Tensor, weight: Tensor, A: Tensor) -> str:
    """``path``, or resolved now for ``"?"`` (under ``torch.compile``)."""
    if path != "?":
        return path
    m, n = weight.shape
    return bank_path(x.device, x.dtype, (math.prod(x.shape[:-1]), n, m, A.shape[0]))


def bank_path(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int]) -> str:
    """``"fused"``, ``"split"`` or ``"lean"``: what :func:`pefttriton.ops.backend.resolve_path` picks for
    the single-adapter op of this shape, with ``weight`` (impossible per row) replaced by ``lean``."""
    path = resolve_path(device, dtype, shape, "none", time_path)
    return path if uses_triton(path) else "lean"


# ------------------------------------------------------------------------------ custom op


@torch.library.custom_op("pefttriton::vera_bank_linear", mutates_args=())
def _vera_bank_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    adapter_ids: Tensor,
    path: str,
) -> Tensor:
    """``y`` (..., m) for ``x`` (..., n) and ``adapter_ids`` (N,), one id per token row."""
    m, n = weight.shape
    path = _run_path(path, x, weight, A)
    x2 = flatten_tokens(x, n)
    y = torch.empty((*x.shape[:-1], m), device=x.device, dtype=x.dtype)
    if x2.shape[0] == 0 or m == 0:
        return y
    out = y.view(x2.shape[0], m)
    with no_autocast(x):
        if path == "lean":
            _lean_forward(x2, weight, bias, A, B, lambda_d, lambda_b, adapter_ids, out)
        else:
            _triton_forward(x2, weight, bias, A, B, lambda_d, lambda_b, adapter_ids, out, split=path == "split")
    return y


@_vera_bank_linear.register_fake
def _(x, weight, bias, A, B, lambda_d, lambda_b, adapter_ids, path):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# ------------------------------------------------------------------------------ public API


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def broadcast_sequence_ids(ids: Tensor, x: Tensor) -> Tensor:
    """Ids set for a batch of ``len(ids)`` sequences, for a batch ``k`` times larger (``generate``
    with beam search or several return sequences repeats each input row ``k`` times in a row)."""
    lead = x.shape[:-1]
    if ids.dim() != 1 or len(lead) < 1 or ids.numel() in (0, lead[0], lead.numel()):
        return ids
    if lead[0] % ids.numel() == 0:
        return ids.repeat_interleave(lead[0] // ids.numel())
    return ids


def vera_bank_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    adapter_ids: Tensor,
    *,
    check_ids: bool = True,
) -> Tensor:
    """VeRA with one adapter per token row, chosen from a bank of adapters sharing ``A`` and ``B``.

    ``y[t] = x[t] W^T + bias + lambda_b[id_t] * ((lambda_d[id_t] * (x[t] A^T)) B^T)``; id ``-1``
    gives ``x[t] W^T + bias``.

    Args:
        x: (..., n) input, float16 / bfloat16 / float32 / float64.
        weight: (m, n) frozen base weight; bias: (m,) or None; same dtype as ``x``.
        A: (r, n) and B: (m, r): the layer's slices of the shared VeRA projections, dtype of ``x``.
        lambda_d: (K, r) and lambda_b: (K, m): the K adapters' vectors, dtype of ``x`` or float32.
        adapter_ids: integer tensor of ids in [-1, K): shape ``x.shape[:-1]`` or (N,) (one per
            token), (batch,) for ``x`` (batch, ...) (one per sequence, broadcast over the rest,
            whatever the sequence length: also the one-token decode steps of ``generate``), or ()
            (one id for every row). Any strides. Dtype int64, int32, int16, int8 or uint8 (the
            last three are widened to int64, a copy of the ids); other dtypes raise TypeError.
        check_ids: check that every id lies in [-1, K) (on CUDA a device-to-host copy of two numbers
            per call); pass False for ids already checked.

    A batch whose ids are known to be all equal (read by ``check_ids``) runs the
    single-adapter engine, :func:`~pefttriton.ops.lowrank_linear` with that adapter's vectors (and
    whichever strategy it picks, the weight-side one included), or the base layer alone for -1.

    Accumulation is in float32 (float64 for float64 inputs) and ``y`` is rounded once. In float16
    the Triton paths round ``h = d * (x A^T)`` to 16 bits for the tensor-core product, scaled by a
    power of two when it would exceed float16's range; the PyTorch path keeps ``h`` in float32.

    Returns:
        (..., m) tensor of ``x.dtype``. Inference first: differentiable only through the PyTorch
        path (any backend but an explicit ``triton``, which raises when a gradient is required).
    """
    return _bank_linear(x, weight, bias, A, B, lambda_d, lambda_b, adapter_ids, check_ids, None)


def _vera_bank_in_range(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    adapter_ids: Tensor,
    *,
    id_range: tuple[int, int],
) -> Tensor:
    """:func:`vera_bank_linear` for ids that the caller checked, with their ``(smallest, largest)``
    value ``id_range`` read then (a :class:`~pefttriton.integration.vera_bank.VeRABank` inside an
    ``adapter_ids`` block: the ids are read once per block, not once per layer).

    Private because the range is trusted: only its form and its bounds against the tables are
    checked here, since reading the ids to verify it is the very cost it spares. A range that is
    not the ids' own gives wrong rows without an error (``(0, 0)`` sends every row of a mixed
    batch through adapter 0).
    """
    return _bank_linear(x, weight, bias, A, B, lambda_d, lambda_b, adapter_ids, False, id_range)


def _check_id_range(id_range, num_adapters: int) -> tuple[int, int]:
    """``id_range`` as a tuple of two ints ``-1 <= smallest <= largest < num_adapters``; else an error."""
    if (
        not isinstance(id_range, tuple)
        or len(id_range) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in id_range)
    ):
        raise TypeError(f"id_range must be a tuple of two ints (smallest, largest id), got {id_range!r}")
    low, high = id_range
    if low > high:
        raise ValueError(f"id_range must be (smallest, largest) with smallest <= largest, got {id_range}")
    if low < -1 or high >= num_adapters:
        raise ValueError(
            f"id_range must lie in [-1, {num_adapters}) (-1: the base layer alone; the bank holds {num_adapters} "
            f"adapters), got {id_range}"
        )
    return id_range


def _bank_linear(x, weight, bias, A, B, lambda_d, lambda_b, adapter_ids, check_ids, id_range) -> Tensor:
    """:func:`vera_bank_linear`, with a known ``id_range`` (:func:`_vera_bank_in_range`) or None."""
    if isinstance(x, Tensor):
        dtype = autocast_dtype(x)
        if dtype is not None:
            x, weight, bias, A, B = (autocast_cast(t, dtype) for t in (x, weight, bias, A, B))
            lambda_d, lambda_b = autocast_cast(lambda_d, torch.float32), autocast_cast(lambda_b, torch.float32)
    m, n = check_x_and_weight(x, weight)
    r = check_adapter(x, m, n, A, B, bias)
    with_fp32 = (x.dtype, torch.float32)
    if not isinstance(lambda_d, Tensor) or lambda_d.dim() != 2 or lambda_d.shape[0] < 1:
        got = tuple(lambda_d.shape) if isinstance(lambda_d, Tensor) else type(lambda_d).__name__
        raise ValueError(f"lambda_d must be a (num_adapters, r) = (K, {r}) tensor with K >= 1, got {got}")
    K = lambda_d.shape[0]
    check_tensor("lambda_d", lambda_d, (K, r), x, with_fp32, "(num_adapters, r)")
    check_tensor("lambda_b", lambda_b, (K, m), x, with_fp32, "(num_adapters, out_features)")
    if id_range is not None:
        id_range = _check_id_range(id_range, K)
        ids, _ = check_adapter_ids(adapter_ids, x, K, check_values=False)
    else:
        ids, id_range = check_adapter_ids(adapter_ids, x, K, check_values=check_ids)
    needs_grad = _needs_grad(x, weight, bias, A, B, lambda_d, lambda_b)
    if id_range is not None and id_range[0] == id_range[1] and not needs_grad:
        # One adapter (or none) for the whole batch: the single-adapter engine and its best strategy.
        i = id_range[0]
        if i < 0:
            return torch.nn.functional.linear(x, weight, bias)
        return lowrank_linear(x, weight, bias, A, B, d=lambda_d[i], b=lambda_b[i])
    if needs_grad:
        if get_backend() == "triton":
            raise RuntimeError(
                "vera_bank_linear's Triton kernel is inference-only: run it under torch.no_grad(), or train "
                "several adapters in one batch with the torch backend (pefttriton.use_backend('torch'))"
            )
        if not torch.compiler.is_compiling():
            record_path("lean")
        return _differentiable(x, weight, bias, A, B, lambda_d, lambda_b, ids)
    if torch.compiler.is_compiling():
        path = "?"
    else:
        path = record_path(bank_path(x.device, x.dtype, (math.prod(x.shape[:-1]), n, m, r)))
    return _vera_bank_linear(x, weight, bias, A, B, lambda_d, lambda_b, ids, path)


# ------------------------------------------------------------------------------ reference


def vera_bank_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    adapter_ids: Tensor,
) -> Tensor:
    """The naive reference, for tests: each row's VeRA formula, written plainly (use float64).

    ``adapter_ids``: one id per token row, shape ``x.shape[:-1]`` or (N,). The per-sequence and 0-d
    forms are for the caller to expand: the reference does not share the op's
    :func:`expand_adapter_ids`, so that a mistake there cannot hide in both.
    """
    rows = x.reshape(-1, x.shape[-1])
    if not isinstance(adapter_ids, Tensor) or adapter_ids.numel() != rows.shape[0]:
        got = tuple(adapter_ids.shape) if isinstance(adapter_ids, Tensor) else type(adapter_ids).__name__
        raise ValueError(f"adapter_ids must hold one id per token row ({rows.shape[0]}), got {got}")
    ids = adapter_ids.reshape(-1).tolist()
    out = []
    for row, i in zip(rows, ids):
        y = weight @ row
        if bias is not None:
            y = y + bias
        if i >= 0:
            y = y + lambda_b[i] * (B @ (lambda_d[i] * (A @ row)))
        out.append(y)
    y = torch.stack(out) if out else rows.new_zeros((0, weight.shape[0]))
    return y.reshape(*x.shape[:-1], weight.shape[0])
