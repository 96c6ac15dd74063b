"""The multi-adapter VeRA GEMM: many VeRA adapters sharing one frozen ``A``, ``B`` in one batch.

Row ``t`` of the batch belongs to adapter ``ids[t]`` (``-1``: the base layer alone)::

    y[t] = x[t] W^T + bias + b[ids[t]] * (h[t] B^T),     h[t] = d[ids[t]] * (x[t] A^T)

``h`` (tokens, rank) is formed before the launch (the per-row ``d`` is a cheap gather over the
rank). The per-row, per-column ``b[ids[t], :]`` cannot be folded into the ``B`` tile the way the
single-adapter kernel folds its ``b`` (it differs per row), so ``_vera_bank_gemm_kernel`` runs the
concatenated-K GEMM of ``pefttriton.kernels.lowrank_linear`` with its two segments swapped: the K
loop over the rank first, then the accumulator tile is multiplied by the gathered ``b`` rows (one
(BLOCK_M, BLOCK_N) load from the (adapters, out) table), then the K loop over the input features
accumulates ``x W^T`` into the same fp32 tile. One accumulator, ``y`` stored once, rounded once,
and the work of one adapter whatever the number of adapters or how the rows mix: a tile reads only
its own rows' ``b`` (BLOCK_M x BLOCK_N values, as many as the tile of ``y`` it writes).

``h_scale`` (a one-element fp32 tensor, read on the device: no host sync) undoes a power-of-two
scaling of ``h`` that keeps it within float16's range; the launcher's caller picks it.

Kernel-local names use GEMM letters: M rows (tokens), N output columns, K reduction, R rank.
"""

import torch
import triton
import triton.language as tl

from pefttriton.kernels.launch import (
    INTERPRET,
    contiguous_vector,
    dot_in_fp32,
    family_pruner,
    gemm_config,
    gemm_family,
    grouped_program_ids,
    input_precision,
    m_bucket,
    run_tuned,
)


# Modest tiles: the gathered ``b`` tile is live beside the accumulator between the two K loops,
# so every config keeps the accumulator at <= 64 fp32 registers per thread (128x128 with 8 warps).
# With triton 3.9 all 64 kernels (fused and split call sites, fp16 / bf16 / fp32 / tf32, sm_80 and
# sm_90) compile with STACK 0 (no spills), at most 228 registers (split, 16-bit, 128x64 on sm_90)
# and 72 KiB of shared memory, tensor cores used for 16-bit and TF32.
GEMM_CONFIGS = {
    "16-bit": [
        gemm_config(128, 128, 32, 8, 3),
        gemm_config(128, 64, 32, 4, 3),
        gemm_config(64, 128, 32, 4, 3),
        gemm_config(64, 64, 32, 4, 4),
        gemm_config(64, 32, 64, 4, 3),
    ],
    "fp32": [
        gemm_config(64, 64, 16, 4, 2),
        gemm_config(32, 64, 32, 4, 2),
        gemm_config(64, 32, 16, 4, 2),
    ],
    "tf32": [
        gemm_config(128, 64, 32, 8, 3),
        gemm_config(64, 64, 32, 4, 3),
        gemm_config(64, 32, 32, 4, 3),
    ],
}
INTERPRET_GEMM_CONFIGS = [gemm_config(32, 32, 32, 4, 1)]



_prune_configs = family_pruner(GEMM_CONFIGS, "lb_ptr")



@triton.autotune(
    configs=INTERPRET_GEMM_CONFIGS if INTERPRET else [c for family in GEMM_CONFIGS.values() for c in family],
    key=["M_BUCKET", "N", "K", "R", "INPUT_PRECISION", "HAS_MAIN"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _vera_bank_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, lb_ptr, bank_b_ptr, ids_ptr, h_scale_ptr, c_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hr, stride_lbn, stride_lbr,
    stride_bank, stride_cm, stride_cn, stride_ym, stride_yn,
    HAS_MAIN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr, HAS_H_SCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] = (c[M, N] +) x[M, K] w[N, K]^T + bias[N] + bank_b[ids[M], N] * h_scale * (h[M, R] lb[N, R]^T).

    Rows whose id is negative get no low-rank term (their ``b`` row is masked to zero).
    HAS_MAIN=False with HAS_C=True adds the low-rank path to a base computed by cuBLAS (``c``,
    float32 for 16-bit inputs), rounding once: the "split" strategy.
    """
    pid_m, pid_n = grouped_program_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Row offsets in int64: tokens * features may exceed 2**31 elements.
    rows = offs_m.to(tl.int64)
    acc_dtype: tl.constexpr = tl.float64 if lb_ptr.dtype.element_ty == tl.float64 else tl.float32
    dot_dtype: tl.constexpr = tl.float32 if DOT_IN_FP32 else lb_ptr.dtype.element_ty

    # First K segment: the rank (h already holds d[ids] * x A^T), padded to BLOCK_K with masks.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    h_ptrs = h_ptr + rows[:, None] * stride_hm + offs_k[None, :] * stride_hr
    lb_ptrs = lb_ptr + offs_k[:, None] * stride_lbr + offs_n[None, :] * stride_lbn
    for r in range(0, tl.cdiv(R, BLOCK_K)):
        r_left = R - r * BLOCK_K
        h_tile = tl.load(h_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < r_left), other=0.0)
        lb_tile = tl.load(lb_ptrs, mask=(offs_k[:, None] < r_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(h_tile.to(dot_dtype), lb_tile.to(dot_dtype), acc, input_precision=INPUT_PRECISION)
        h_ptrs += BLOCK_K * stride_hr
        lb_ptrs += BLOCK_K * stride_lbr

    # Each row's own b: a gather of table rows (int64 offsets: adapters * out may exceed 2**31).
    ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=-1)
    adapted = ids >= 0
    bank_ptrs = bank_b_ptr + ids.to(tl.int64)[:, None] * stride_bank + offs_n[None, :]
    b_rows = tl.load(bank_ptrs, mask=adapted[:, None] & mask_n[None, :], other=0.0).to(acc_dtype)
    if HAS_H_SCALE:
        b_rows = b_rows * tl.load(h_scale_ptr).to(acc_dtype)
    acc = acc * b_rows

    # Second K segment: the base GEMM, accumulated into the same tile.
    if HAS_MAIN:
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + offs_k.to(tl.int64)[:, None] * stride_wk + offs_n.to(tl.int64)[None, :] * stride_wn  # out * in may pass 2**31
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            w_tile = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            acc = tl.dot(x_tile.to(dot_dtype), w_tile.to(dot_dtype), acc, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(acc_dtype)[None, :]
    mask_y = mask_m[:, None] & mask_n[None, :]
    if HAS_C:
        c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
        acc += tl.load(c_ptrs, mask=mask_y, other=0.0).to(acc_dtype)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)


def vera_bank_gemm(
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    lowrank_B: torch.Tensor,
    bank_b: torch.Tensor,
    ids: torch.Tensor,
    out: torch.Tensor,
    h_scale: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = (base +) x @ weight.T + bias + bank_b[ids] * h_scale * (h @ lowrank_B.T)``, one launch.

    x: (M, K) and weight: (N, K), or both None with ``base`` (M, N) given (the base GEMM ran
    elsewhere); bias: (N,) or None; h: (M, R) in the dtype of ``lowrank_B`` (N, R); bank_b:
    (adapters, N), any float dtype; ids: (M,) integer, a negative id selects no adapter;
    h_scale: a one-element float32 tensor or None (1). ``out`` (M, N) is written (never read).
    Matrices may have any strides; ``ids``, ``bias`` and the rows of ``bank_b`` are made contiguous.
    Returns ``out``.
    """
    has_main = x is not None
    if has_main == (base is not None):
        raise ValueError("vera_bank_gemm needs exactly one of x (with weight) and base")
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    bias = contiguous_vector(bias)
    ids = ids.to(torch.int32).contiguous()
    if bank_b.stride(1) != 1:
        bank_b = bank_b.contiguous()
    dummy = lowrank_B  # never read where its constexpr flag is off
    x_ = x if has_main else dummy
    w_ = weight if has_main else dummy
    c_ = base if base is not None else out
    K = x.shape[1] if has_main else 0
    R = h.shape[1]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    run_tuned(
        _vera_bank_gemm_kernel, grid, out, x_, w_, bias if bias is not None else dummy, h, lowrank_B, bank_b, ids,
        h_scale if h_scale is not None else dummy, c_, out,
        M, N, K, R, m_bucket(M),
        x_.stride(0), x_.stride(1), w_.stride(0), w_.stride(1), h.stride(0), h.stride(1),
        lowrank_B.stride(0), lowrank_B.stride(1), bank_b.stride(0),
        c_.stride(0), c_.stride(1), out.stride(0), out.stride(1),
        HAS_MAIN=has_main, HAS_BIAS=bias is not None, HAS_C=base is not None, HAS_H_SCALE=h_scale is not None,
        INPUT_PRECISION=input_precision(lowrank_B.dtype), DOT_IN_FP32=dot_in_fp32(lowrank_B.dtype),
        prune=_prune_configs,
    )
    return out


__all__ = ["GEMM_CONFIGS", "gemm_family", "vera_bank_gemm"]
