"""LoRMA-pi's shifted product ``M = scale * shift(B A)``, formed straight from the factors, and its backward.

The permutation variant of LoRMA multiplies the frozen weight on the left by

    M[i, j] = scale * (B A)[i, (j - i) mod m]        B: (m, r), A: (r, m)

(row i of ``B A`` rolled right by i; the authors' ``torch.gather(M, 1, (j - i) % m)``). Writing
``d = (j - i) mod m``, entry (i, d) of the plain product lands at column ``(i + d) mod m`` of row i.
So ``_shift_product_kernel`` is an ordinary tiled GEMM over the rank (the low-rank K loop of the
engine) whose store is skewed: each row of the (rows x d) accumulator tile goes to a contiguous,
wrapped run of columns of ``M``. The unshifted ``B A`` never exists in memory; ``M`` is written once.

Backward: with ``Gs[i, d] = G[i, (i + d) mod m]`` (G = dL/dM, read with the same skew),
``grad_B = scale * Gs A^T`` and ``grad_A = scale * B^T Gs``. Two kernels, one per gradient, each a
K loop over m that reads ``G`` once per rank block; the K loop is split across programs (partial sums,
reduced by the launcher, no atomics) so that a few output blocks still fill the GPU.

Every pointer and every dot here is in the accumulation dtype (fp32, or fp64 for fp64 factors):
the launchers upcast 16-bit factors first (r * m elements). ``G`` is an fp32 sum over tokens that
can overflow fp16, and forming ``M`` costs only r FMAs per stored element, so it is bound by the
m^2 stores and tensor cores would not pay. fp32 dots use IEEE precision unless
``torch.backends.cuda.matmul.allow_tf32`` is set (the engine's rule).

Kernel-local names: M is the matrix size (out_features of the adapted layer), R the rank.
"""

import torch
import triton
import triton.language as tl

from pefttriton.kernels.launch import INTERPRET, acc_dtype, grouped_program_ids, input_precision, run_tuned


def _config(warps, stages, **blocks):
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


# fp32 FMA dots (or TF32): small tiles. Every config compiles without spills for sm_80 and sm_90 in
# both precisions (checked with pefttriton.tools.kernel_report.compile_one).
SHIFT_CONFIGS = [
    _config(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16),
    _config(8, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=16),
    _config(8, 2, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32),
]
INTERPRET_SHIFT_CONFIGS = [_config(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16)]

# Backward: the output block over m is fixed (GRAD_OUT_BLOCK, it sizes the partial-sum buffers), the
# rank block is the one the launcher derives from r (configs of the other sizes are pruned), only the
# K block over m and the pipelining are tuned. fp32 FMA dots on sm_80 are register-hungry: with 4
# warps, BLOCK_K=64 spills at every rank block and BLOCK_R=64 spills even at BLOCK_K=32; these do
# not (grad_A at BLOCK_K=64, BLOCK_R=16 spills 8 bytes with 3 stages, not with 2).
GRAD_OUT_BLOCK = 64
GRAD_B_CONFIGS = [
    _config(8, 3, BLOCK_K=32, BLOCK_R=16),
    _config(8, 3, BLOCK_K=64, BLOCK_R=16),
    _config(8, 3, BLOCK_K=32, BLOCK_R=32),
    _config(8, 2, BLOCK_K=32, BLOCK_R=32),
    _config(8, 3, BLOCK_K=32, BLOCK_R=64),
]
GRAD_A_CONFIGS = [
    _config(8, 3, BLOCK_K=32, BLOCK_R=16),
    _config(8, 2, BLOCK_K=64, BLOCK_R=16),
    _config(8, 3, BLOCK_K=32, BLOCK_R=32),
    _config(8, 2, BLOCK_K=32, BLOCK_R=32),
    _config(8, 3, BLOCK_K=32, BLOCK_R=64),
]
INTERPRET_GRAD_CONFIGS = [_config(4, 1, BLOCK_K=32, BLOCK_R=block_r) for block_r in (16, 32, 64)]
# Each program of the split K loop covers a multiple of this many columns (the largest K block).
SPLIT_GRANULE = 32 if INTERPRET else 64
# Aim for at least this many programs per backward kernel (about two waves on an H100's 132 SMs).
TARGET_PROGRAMS = 264

CONFIGS = {
    "_shift_product_kernel": SHIFT_CONFIGS,
    "_shift_grad_b_kernel": GRAD_B_CONFIGS,
    "_shift_grad_a_kernel": GRAD_A_CONFIGS,
}


def rank_block(rank: int) -> int:
    """BLOCK_R for a rank: a power of two >= 16 (``tl.dot`` minimum), at most 64 (more ranks: more programs)."""
    return max(16, min(64, triton.next_power_of_2(rank)))


def _prune_by_rank(configs, named_args, **kwargs):
    block_r = rank_block(named_args["R"])
    return [config for config in configs if config.kwargs["BLOCK_R"] == block_r]


@triton.jit
def _wrap(cols, M):
    # (i + d) mod m for 0 <= i, d < m, without an integer division.
    return tl.where(cols >= M, cols - M, cols)


@triton.autotune(configs=INTERPRET_SHIFT_CONFIGS if INTERPRET else SHIFT_CONFIGS, key=["M", "R", "INPUT_PRECISION"])
@triton.jit
def _shift_product_kernel(
    b_ptr, a_ptr, out_ptr,
    M, R, scale,
    stride_bm, stride_br, stride_ar, stride_am, stride_om, stride_on,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[i, (i + d) mod M] = scale * sum_k b[i, k] a[k, d] for one (BLOCK_M rows, BLOCK_N d) tile."""
    pid_m, pid_n = grouped_program_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(M, BLOCK_N), GROUP_M)
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_i = offs_i < M
    mask_d = offs_d < M
    rows = offs_i.to(tl.int64)  # M * M may exceed 2**31 elements
    acc_dtype: tl.constexpr = tl.float64 if b_ptr.dtype.element_ty == tl.float64 else tl.float32

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    b_ptrs = b_ptr + rows[:, None] * stride_bm + offs_k[None, :] * stride_br
    a_ptrs = a_ptr + offs_k[:, None] * stride_ar + offs_d[None, :] * stride_am
    for k in range(0, tl.cdiv(R, BLOCK_K)):
        mask_k = offs_k < R - k * BLOCK_K  # the rank, padded to BLOCK_K with masks
        b_tile = tl.load(b_ptrs, mask=mask_i[:, None] & mask_k[None, :], other=0.0).to(acc_dtype)
        a_tile = tl.load(a_ptrs, mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(acc_dtype)
        acc = tl.dot(b_tile, a_tile, acc, input_precision=INPUT_PRECISION)
        b_ptrs += BLOCK_K * stride_br
        a_ptrs += BLOCK_K * stride_ar

    # The skewed store: per row a contiguous run of columns, wrapped once at most.
    cols = _wrap(offs_i[:, None] + offs_d[None, :], M)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols * stride_on
    tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_d[None, :])


@triton.autotune(
    configs=INTERPRET_GRAD_CONFIGS if INTERPRET else GRAD_B_CONFIGS,
    key=["M", "R", "CHUNK", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_by_rank},
)
@triton.jit
def _shift_grad_b_kernel(
    g_ptr, a_ptr, part_ptr,
    M, R, CHUNK, scale,
    stride_gm, stride_gn, stride_ar, stride_am, stride_ps, stride_pm, stride_pr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """part[s, i, k] = scale * sum over d in chunk s of G[i, (i + d) mod M] a[k, d].

    Grid: (row blocks, rank blocks, K splits). Summing ``part`` over s gives grad_B (M, R).
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_i = offs_i < M
    mask_r = offs_r < R
    rows = offs_i.to(tl.int64)
    acc_dtype: tl.constexpr = tl.float64 if g_ptr.dtype.element_ty == tl.float64 else tl.float32

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=acc_dtype)
    start = pid_s * CHUNK
    for k in range(0, tl.cdiv(CHUNK, BLOCK_K)):
        offs_d = start + k * BLOCK_K + offs_k
        mask_d = offs_d < M
        cols = _wrap(offs_i[:, None] + offs_d[None, :], M)
        g_tile = tl.load(g_ptr + rows[:, None] * stride_gm + cols * stride_gn,
                         mask=mask_i[:, None] & mask_d[None, :], other=0.0).to(acc_dtype)
        a_t = tl.load(a_ptr + offs_d[:, None] * stride_am + offs_r[None, :] * stride_ar,
                      mask=mask_d[:, None] & mask_r[None, :], other=0.0).to(acc_dtype)  # A^T tile (d, k)
        acc = tl.dot(g_tile, a_t, acc, input_precision=INPUT_PRECISION)
    part_ptrs = part_ptr + pid_s * stride_ps + rows[:, None] * stride_pm + offs_r[None, :] * stride_pr
    tl.store(part_ptrs, acc * scale, mask=mask_i[:, None] & mask_r[None, :])


@triton.autotune(
    configs=INTERPRET_GRAD_CONFIGS if INTERPRET else GRAD_A_CONFIGS,
    key=["M", "R", "CHUNK", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_by_rank},
)
@triton.jit
def _shift_grad_a_kernel(
    g_ptr, b_ptr, part_ptr,
    M, R, CHUNK, scale,
    stride_gm, stride_gn, stride_bm, stride_br, stride_ps, stride_pr, stride_pn,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """part[s, k, d] = scale * sum over rows i in chunk s of b[i, k] G[i, (i + d) mod M].

    Grid: (d blocks, rank blocks, K splits). Summing ``part`` over s gives grad_A (R, M).
    """
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_d = offs_d < M
    mask_r = offs_r < R
    acc_dtype: tl.constexpr = tl.float64 if g_ptr.dtype.element_ty == tl.float64 else tl.float32

    # The transposed product grad_A^T = unshift(G)^T B, so the accumulator's long side is the d block
    # (64): on sm_90 that is what lets tl.dot use wgmma rather than mma.sync.
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=acc_dtype)
    start = pid_s * CHUNK
    for k in range(0, tl.cdiv(CHUNK, BLOCK_K)):
        offs_i = start + k * BLOCK_K + offs_k
        mask_i = offs_i < M
        rows = offs_i.to(tl.int64)
        cols = _wrap(offs_d[:, None] + offs_i[None, :], M)
        g_t = tl.load(g_ptr + rows[None, :] * stride_gm + cols * stride_gn,
                      mask=mask_d[:, None] & mask_i[None, :], other=0.0).to(acc_dtype)  # unshift(G)^T tile (d, i)
        b_tile = tl.load(b_ptr + rows[:, None] * stride_bm + offs_r[None, :] * stride_br,
                         mask=mask_i[:, None] & mask_r[None, :], other=0.0).to(acc_dtype)  # (i, k)
        acc = tl.dot(g_t, b_tile, acc, input_precision=INPUT_PRECISION)
    part_ptrs = part_ptr + pid_s * stride_ps + offs_d[:, None] * stride_pn + offs_r[None, :] * stride_pr
    tl.store(part_ptrs, acc * scale, mask=mask_d[:, None] & mask_r[None, :])


# ------------------------------------------------------------------------------------ launchers


def shift_product(B: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * shift(B @ A)`` with ``shift(P)[i, j] = P[i, (j - i) mod m]``, in one launch.

    B: (m, r), A: (r, m), one float dtype, any strides. Returns a new contiguous (m, m) tensor in the
    accumulation dtype (fp32, or fp64 for fp64 factors). Cost: r * m^2 FMAs, m^2 stores.
    """
    m, r = B.shape
    acc = acc_dtype(B.dtype)
    B, A = B.to(acc), A.to(acc)  # no-op for fp32 / fp64 factors
    out = torch.empty((m, m), device=B.device, dtype=acc)
    if m == 0:
        return out

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(m, meta["BLOCK_N"]),)

    run_tuned(
        _shift_product_kernel, grid, out, B, A, out, m, r, float(scale),
        B.stride(0), B.stride(1), A.stride(0), A.stride(1), out.stride(0), out.stride(1),
        INPUT_PRECISION=input_precision(out.dtype), GROUP_M=8,
    )
    return out


def split_chunk(m: int, out_programs: int, split: int | None = None) -> int:
    """Columns of the K loop per program: a multiple of SPLIT_GRANULE.

    By default the K loop is split until about TARGET_PROGRAMS programs run, but never into
    chunks shorter than 8 granules (the partial sums then cost less than the K loop).
    ``split`` forces a number of splits (tests use it to cover the reduction).
    """
    granules = triton.cdiv(m, SPLIT_GRANULE)
    if split is None:
        split = max(1, min(triton.cdiv(TARGET_PROGRAMS, out_programs), granules // 8))
    split = max(1, min(split, granules))
    return triton.cdiv(granules, split) * SPLIT_GRANULE


def shift_product_grads(
    G: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float, need_B: bool = True, need_A: bool = True,
    split: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward of :func:`shift_product`: ``(grad_B, grad_A)`` from ``G = dL/dM``.

    G: (m, m), B: (m, r), A: (r, m), any strides. ``grad_B = scale * unshift(G) A^T`` (m, r) and
    ``grad_A = scale * B^T unshift(G)`` (r, m) with ``unshift(G)[i, d] = G[i, (i + d) mod m]``, in
    the accumulation dtype; None where not needed. Each reads G once per rank block of 64.
    """
    m, r = B.shape
    acc = acc_dtype(B.dtype)
    G, B, A = G.to(acc), B.to(acc), A.to(acc)
    r_blocks = triton.cdiv(r, rank_block(r))
    precision = input_precision(acc)
    grad_B = grad_A = None
    if need_B:
        out_blocks = triton.cdiv(m, GRAD_OUT_BLOCK)
        chunk = split_chunk(m, out_blocks * r_blocks, split)
        splits = triton.cdiv(m, chunk) if m else 1
        part = torch.empty((splits, m, r), device=G.device, dtype=acc)
        if m > 0:
            run_tuned(
                _shift_grad_b_kernel, (out_blocks, r_blocks, splits), part, G, A, part, m, r, chunk, float(scale),
                G.stride(0), G.stride(1), A.stride(0), A.stride(1), part.stride(0), part.stride(1), part.stride(2),
                INPUT_PRECISION=precision, BLOCK_M=GRAD_OUT_BLOCK, prune=_prune_by_rank,
            )
        grad_B = part[0] if splits == 1 else part.sum(0)
    if need_A:
        out_blocks = triton.cdiv(m, GRAD_OUT_BLOCK)
        chunk = split_chunk(m, out_blocks * r_blocks, split)
        splits = triton.cdiv(m, chunk) if m else 1
        part = torch.empty((splits, r, m), device=G.device, dtype=acc)
        if m > 0:
            run_tuned(
                _shift_grad_a_kernel, (out_blocks, r_blocks, splits), part, G, B, part, m, r, chunk, float(scale),
                G.stride(0), G.stride(1), B.stride(0), B.stride(1), part.stride(0), part.stride(1), part.stride(2),
                INPUT_PRECISION=precision, BLOCK_N=GRAD_OUT_BLOCK, prune=_prune_by_rank,
            )
        grad_A = part[0] if splits == 1 else part.sum(0)
    return grad_B, grad_A
