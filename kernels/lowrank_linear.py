"""The fused linear + low-rank engine: one GEMM kernel and one low-rank backward kernel.

Every adapter of pefttriton reduces to

    y = x W^T + bias + b * ((scale * d * (x A^T)) B^T)

and these two kernels implement it, forward and backward, with no (tokens, out) intermediate:

* ``_fused_gemm_kernel`` is the tiled GEMM of the Triton tutorial with a second K segment:
  after the K loop over the input features of ``W`` it runs over the rank of the low-rank path
  (a concatenated-K GEMM), so ``y`` is written once. ``b`` scales the low-rank tile of ``B``
  (``b * (h B^T) == h (b * B)^T``), ``bias`` is added in the epilogue. The same kernel serves the
  down projection ``x A^T`` (no low-rank segment) and ``grad_x = g W + gh A`` (strides swapped).
* ``_lowrank_grad_kernel`` reads the output gradient ``g`` tile by tile and produces, in one pass,
  ``gh = scale * d * ((b * g) B)`` and per-block partial sums of ``grad_d`` and ``grad_b``.

Kernel-local names use GEMM letters: M rows (tokens), N output columns, K reduction, R rank.
Launchers take tensors of any strides (matrices are read through their strides, vectors made
contiguous); validation and autograd live in ``pefttriton.ops``.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from pefttriton.kernels.launch import (
    INTERPRET,
    acc_dtype,
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


# Autotune configs per dot family, chosen so that every one compiles without spills for sm_80 and
# sm_90 at every call site, with triton 3.6 (the oldest supported) and 3.9 (``python -m
# pefttriton.tools.kernel_report`` checks; a test enforces it for the installed Triton).
# 16-bit: tutorial tile shapes, 8 warps for 128x128 (4 warps spill once the low-rank segment and
# epilogue vectors are live), plus narrow tiles for the down projection, whose width is the rank.
# fp32 IEEE dots run on FMA units and hold far more registers per tile, so their tiles are small.
GEMM_CONFIGS = {
    "16-bit": [
        gemm_config(128, 128, 64, 8, 3),
        gemm_config(128, 128, 32, 8, 2),  # 3 or 4 stages spill 8 bytes (split grad_x, sm_80) with triton 3.6 or 3.9
        gemm_config(128, 64, 32, 4, 4),
        gemm_config(64, 128, 32, 4, 4),
        gemm_config(64, 64, 32, 4, 4),
        gemm_config(128, 32, 32, 4, 4),
        gemm_config(64, 32, 64, 4, 4),
        gemm_config(64, 16, 64, 4, 3),
    ],
    # (32, 64, 32) with 4 warps spills 8 bytes in grad_x on sm_90 since the weight's offsets are 64-bit
    "fp32": [
        gemm_config(128, 128, 16, 8, 3),
        gemm_config(64, 64, 16, 4, 3),
        gemm_config(64, 32, 16, 4, 2),  # 3 stages spill 8 bytes on sm_90 with triton 3.6
    ],
    "tf32": [
        gemm_config(128, 128, 32, 8, 3),
        gemm_config(64, 128, 32, 4, 3),
        gemm_config(64, 64, 32, 4, 3),
        gemm_config(128, 32, 32, 4, 3),
        gemm_config(64, 16, 32, 4, 3),
    ],
}
INTERPRET_GEMM_CONFIGS = [gemm_config(32, 32, 32, 4, 1)]

# Launches that draw a dropout mask (Philox per element of a tile) hold more registers: the tiles
# above spill up to 3 KB there. These compile without spills for sm_80 and sm_90 at the three
# dropout call sites (x A^T, grad_A, grad_x's masked product), with triton 3.6 and 3.9; "fp32"
# serves both IEEE and TF32 dots.
DROPOUT_CONFIGS = {
    "16-bit": [
        gemm_config(64, 64, 32, 8, 3),
        gemm_config(64, 64, 32, 8, 2),
        gemm_config(64, 32, 32, 8, 2),
        gemm_config(64, 16, 32, 4, 2),
        gemm_config(32, 32, 32, 4, 2),
    ],
    "fp32": [
        gemm_config(64, 64, 16, 8, 2),
        gemm_config(64, 32, 16, 8, 2),  # 4 warps spill 8 bytes in x A^T on sm_90
        gemm_config(32, 64, 16, 4, 2),
        gemm_config(32, 32, 16, 4, 2),
    ],
}

# The Hopper variant (tensor descriptors, persistent tiles): the persistent-matmul tutorial's tiles
# for wgmma, 128x256 included; compiled for sm_90 without spills (the kernel report). Only 16-bit
# and TF32 dots: IEEE fp32 dots run on FMA units, where TMA loads buy nothing.
TMA_CONFIGS = {
    "16-bit": [
        gemm_config(128, 256, 64, 8, 3),
        gemm_config(128, 128, 64, 8, 4),
        gemm_config(128, 128, 64, 4, 4),
        gemm_config(128, 64, 64, 4, 4),
    ],
    # 128x256 spills 272 bytes in grad_x (W read as (K, N): fp32 wgmma wants K-major operands)
    "tf32": [
        gemm_config(128, 128, 32, 8, 3),
        gemm_config(128, 64, 32, 4, 4),
    ],
}
INTERPRET_TMA_CONFIGS = [gemm_config(32, 32, 32, 4, 1)]

# The low-rank backward kernel: BLOCK_M and BLOCK_R are picked from the rank by the launcher
# (they size the partial-sum buffers), only the sweep over the output columns is tuned. With
# 4 warps, or BLOCK_N=64, it spills at BLOCK_R=64; these two do not, for every dtype.
GRAD_CONFIGS = [
    # BLOCK_N=32 spills for fp32 at BLOCK_R=16 on sm_80 with triton 3.6 (8 bytes, 2 stages; 3 stages on sm_90)
    triton.Config({"BLOCK_N": 16}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 16}, num_warps=8, num_stages=2),
]
INTERPRET_GRAD_CONFIGS = [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]



# The launcher passes B as w_ptr when there is no main segment, so w_ptr always has the input dtype.
_prune_gemm_configs = family_pruner(GEMM_CONFIGS, "w_ptr")


def grad_blocks(rank: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_R) of the low-rank backward kernel for a given rank.

    ``tl.dot`` needs every dimension >= 16 and ``tl.arange`` a power of two, so small ranks
    are padded (masked) up to 16. Above 64 the rank is split across programs: each one then
    reads ``g`` once, so ``g`` is read ``ceil(r / 64)`` times in all (from L2 after the first:
    the rank blocks of a row block are neighbouring programs).
    """
    block_r = max(16, min(64, triton.next_power_of_2(rank)))
    return 64, block_r


@triton.jit
def _dropout(tile, seed, offsets, drop_p, drop_scale):
    """``tile`` with each element dropped (zero) with probability ``drop_p`` and the others scaled
    by ``drop_scale = 1 / (1 - drop_p)``. Whether an element is kept depends on ``seed`` and its
    ``offsets`` alone (Philox: ``tl.rand``), so every kernel that reads an element of the same
    tensor, in whatever tile, draws the same decision; the mask never reaches memory."""
    keep = tl.rand(seed, offsets) >= drop_p
    return tl.where(keep, tile.to(tl.float32) * drop_scale, 0.0)


@triton.jit
def _fused_gemm(
    x_ptr, w_ptr, bias_ptr, h_ptr, d_ptr, lb_ptr, bvec_ptr, c_ptr, y_ptr, seed_ptr,
    M, N, K, R, scale, M_BUCKET, drop_p, drop_scale, DROP_COLS,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_hm, stride_hr, stride_lbn, stride_lbr,
    stride_cm, stride_cn, stride_ym, stride_yn,
    HAS_MAIN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_D: tl.constexpr,
    HAS_BVEC: tl.constexpr, ACCUMULATE: tl.constexpr, C_IS_Y: tl.constexpr,
    DROP_X: tl.constexpr, DROP_W: tl.constexpr, DROP_LOWRANK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] = (c[M, N] +) x[M, K] w[N, K]^T + bias[N] + bvec[N] * ((scale * d[R] * h[M, R]) lb[N, R]^T).

    HAS_MAIN=False drops the x w^T segment and ACCUMULATE=True adds c (y itself, or a float32
    base computed by cuBLAS) in the epilogue: together they add the low-rank path to a base GEMM
    computed by cuBLAS, rounding once. M_BUCKET is the autotune key's token count (a power of
    two), so a new token count in the same bucket reuses the tuned config.

    Dropout of the adapter's input (a tensor ``X`` of ``DROP_COLS`` columns, the seed at
    ``seed_ptr``, :func:`_dropout`) where one operand or the result is an image of ``X``: the x
    tiles (``DROP_X``: ``x`` is ``X``, the forward's ``X A^T``), the w tiles (``DROP_W``: ``w`` is
    ``X^T``, as ``grad_A = gh^T X`` reads it) or the low-rank product (``DROP_LOWRANK`` with
    ``HAS_MAIN=False``: ``y`` has ``X``'s shape, as ``grad_x += mask * (gh A)`` does).
    """
    pid_m, pid_n = grouped_program_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Offsets in int64 wherever a product can pass 2**31 elements: tokens * features (x, y), and
    # out * in of the weight (a large lm_head; the transposed view grad_x reads steps the other way).
    rows = offs_m.to(tl.int64)
    acc_dtype: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    dot_dtype: tl.constexpr = tl.float32 if DOT_IN_FP32 else w_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    if HAS_MAIN:
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + offs_k.to(tl.int64)[:, None] * stride_wk + offs_n.to(tl.int64)[None, :] * stride_wn
        if DROP_X or DROP_W:
            seed = tl.load(seed_ptr)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            w_tile = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            if DROP_X:  # x is X: element (row, k) of X
                cols = (k * BLOCK_K + offs_k).to(tl.int64)
                x_tile = _dropout(x_tile, seed, rows[:, None] * DROP_COLS + cols[None, :], drop_p, drop_scale)
            if DROP_W:  # w is X^T: w[n, k] is element (k, n) of X
                x_rows = (k * BLOCK_K + offs_k).to(tl.int64)
                w_tile = _dropout(w_tile, seed, x_rows[:, None] * DROP_COLS + offs_n[None, :], drop_p, drop_scale)
            acc = tl.dot(x_tile.to(dot_dtype), w_tile.to(dot_dtype), acc, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

    if HAS_LOWRANK:
        # Second K segment: the rank, padded to BLOCK_K with masks.
        h_ptrs = h_ptr + rows[:, None] * stride_hm + offs_k[None, :] * stride_hr
        lb_ptrs = lb_ptr + offs_k[:, None] * stride_lbr + offs_n[None, :] * stride_lbn
        if HAS_BVEC:
            bvec = tl.load(bvec_ptr + offs_n, mask=mask_n, other=0.0).to(acc_dtype)
        for r in range(0, tl.cdiv(R, BLOCK_K)):
            r_left = R - r * BLOCK_K
            mask_r = offs_k < r_left
            h_tile = tl.load(h_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(acc_dtype)
            if HAS_D:
                d = tl.load(d_ptr + r * BLOCK_K + offs_k, mask=mask_r, other=0.0).to(acc_dtype)
                h_tile = h_tile * (d * scale)[None, :]
            else:
                h_tile = h_tile * scale
            lb_tile = tl.load(lb_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            if HAS_BVEC:
                lb_tile = lb_tile.to(acc_dtype) * bvec[None, :]
            acc = tl.dot(h_tile.to(dot_dtype), lb_tile.to(dot_dtype), acc, input_precision=INPUT_PRECISION)
            h_ptrs += BLOCK_K * stride_hr
            lb_ptrs += BLOCK_K * stride_lbr

    if DROP_LOWRANK:  # only the low-rank product is in acc (HAS_MAIN=False): y is X-shaped
        acc = _dropout(acc, tl.load(seed_ptr), rows[:, None] * DROP_COLS + offs_n[None, :], drop_p, drop_scale)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(acc_dtype)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask_y = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        if C_IS_Y:  # in place: no second set of pointers held (registers)
            acc += tl.load(y_ptrs, mask=mask_y, other=0.0).to(acc_dtype)
        else:
            c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
            acc += tl.load(c_ptrs, mask=mask_y, other=0.0).to(acc_dtype)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)


def _gemm_autotuner(restore: bool):
    return triton.autotune(
        configs=INTERPRET_GEMM_CONFIGS if INTERPRET else [c for family in GEMM_CONFIGS.values() for c in family],
        key=["M_BUCKET", "N", "K", "R", "INPUT_PRECISION", "HAS_MAIN", "ACCUMULATE"],
        prune_configs_by={"early_config_prune": _prune_gemm_configs},
        # Benchmarking runs each config on the real arguments: an accumulating launch that adds into
        # y itself would add again on every run, so y is restored after each one (only while tuning
        # a new key). The overwriting launches need no copy of y.
        restore_value=["y_ptr"] if restore else [],
    )


# One kernel, two autotuners: the accumulating launches restore y while tuning, the others do not.
_fused_gemm_kernel = _gemm_autotuner(restore=False)(_fused_gemm)
_fused_gemm_accumulate_kernel = _gemm_autotuner(restore=True)(_fused_gemm)


def _prune_dropout_configs(candidates, named_args, **kwargs):
    """``early_config_prune`` of the dropout launches: DROPOUT_CONFIGS of the dot family."""
    if INTERPRET:
        return candidates
    family = gemm_family(named_args["w_ptr"].dtype, kwargs["INPUT_PRECISION"])
    family = DROPOUT_CONFIGS["16-bit" if family == "16-bit" else "fp32"]
    return [config for config in candidates if any(config is mine for mine in family)]


# The launches with a dropout mask: their own configs; y restored while tuning (grad_x's masked
# product adds into y in place).
_fused_gemm_dropout_kernel = triton.autotune(
    configs=INTERPRET_GEMM_CONFIGS if INTERPRET else [c for family in DROPOUT_CONFIGS.values() for c in family],
    key=["M_BUCKET", "N", "K", "R", "INPUT_PRECISION", "HAS_MAIN", "ACCUMULATE"],
    prune_configs_by={"early_config_prune": _prune_dropout_configs},
    restore_value=["y_ptr"],
)(_fused_gemm)



@triton.autotune(configs=INTERPRET_GRAD_CONFIGS if INTERPRET else GRAD_CONFIGS, key=["M_BUCKET", "N", "R"])
@triton.jit
def _lowrank_grad_kernel(
    g_ptr, xa_ptr, d_ptr, lb_ptr, bvec_ptr, gh_ptr, grad_d_part_ptr, grad_b_part_ptr,
    M, N, R, scale, M_BUCKET,
    stride_gm, stride_gn, stride_xam, stride_xar, stride_lbn, stride_lbr, stride_ghm, stride_ghr,
    HAS_D: tl.constexpr, HAS_BVEC: tl.constexpr, NEED_GRAD_D: tl.constexpr, NEED_GRAD_B: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program per (row block, rank block); it sweeps g[M, N] once along N and produces

    gh[M, R]           = scale * d * ((bvec * g) lb)
    grad_d_part[pm, R] = sum over its rows of xa * ((bvec * g) lb)         (times scale later)
    grad_b_part[pm * num_r_blocks + pr, N] = sum over its rows of g * (h lb^T)[:, this rank block]
    with h = scale * d * xa. Partial sums are reduced by the launcher (deterministic, no atomics).
    """
    # Rank blocks of one row block are consecutive programs: they run together and read the
    # same g tiles, so g comes from DRAM about once and from L2 for the other rank blocks.
    pid = tl.program_id(0)
    num_r_blocks = tl.cdiv(R, BLOCK_R)
    pid_m = pid // num_r_blocks
    pid_r = pid % num_r_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_r = offs_r < R
    rows = offs_m.to(tl.int64)
    acc_dtype: tl.constexpr = tl.float64 if lb_ptr.dtype.element_ty == tl.float64 else tl.float32
    dot_dtype: tl.constexpr = tl.float32 if DOT_IN_FP32 else lb_ptr.dtype.element_ty

    mask_mr = mask_m[:, None] & mask_r[None, :]
    xa = tl.load(xa_ptr + rows[:, None] * stride_xam + offs_r[None, :] * stride_xar, mask=mask_mr, other=0.0)
    xa = xa.to(acc_dtype)
    if HAS_D:
        dscale = tl.load(d_ptr + offs_r, mask=mask_r, other=0.0).to(acc_dtype) * scale
    else:
        dscale = tl.zeros((BLOCK_R,), dtype=acc_dtype) + scale
    if NEED_GRAD_B:
        h = (xa * dscale[None, :]).to(dot_dtype)

    g_rank = tl.zeros((BLOCK_M, BLOCK_R), dtype=acc_dtype)  # (bvec * g) lb: g in the rank space
    g_ptrs = g_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn
    lb_ptrs = lb_ptr + offs_r[:, None] * stride_lbr + offs_n[None, :] * stride_lbn
    part_row = pid
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        mask_n = offs_n < N - n * BLOCK_N
        g_tile = tl.load(g_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        lb_tile = tl.load(lb_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(dot_dtype)  # (R, N)
        if NEED_GRAD_B:
            # This rank block's share of h B^T, recomputed here instead of saved in forward.
            lowrank_out = tl.dot(h, lb_tile, input_precision=INPUT_PRECISION)
            part = tl.sum(g_tile.to(acc_dtype) * lowrank_out, axis=0)
            tl.store(grad_b_part_ptr + part_row * N + n * BLOCK_N + offs_n, part, mask=mask_n)
        if HAS_BVEC:
            bvec = tl.load(bvec_ptr + n * BLOCK_N + offs_n, mask=mask_n, other=0.0).to(acc_dtype)
            g_tile = g_tile.to(acc_dtype) * bvec[None, :]
        g_rank = tl.dot(g_tile.to(dot_dtype), tl.trans(lb_tile), g_rank, input_precision=INPUT_PRECISION)
        g_ptrs += BLOCK_N * stride_gn
        lb_ptrs += BLOCK_N * stride_lbn

    gh = g_rank * dscale[None, :]
    tl.store(gh_ptr + rows[:, None] * stride_ghm + offs_r[None, :] * stride_ghr, gh, mask=mask_mr)
    if NEED_GRAD_D:
        tl.store(grad_d_part_ptr + pid_m * R + offs_r, tl.sum(xa * g_rank, axis=0), mask=mask_r)


class Dropout(NamedTuple):
    """Dropout of an adapter's input ``X`` (tokens, ``cols``) inside a launch: each element of ``X``
    is dropped with probability ``p`` (the rest scaled by ``1 / (1 - p)``), decided by ``seed`` (a
    one-element int64 tensor on the launch's device) and the element's index in ``X`` alone, so
    the forward and backward launches that read ``X`` draw the same mask (:func:`dropout_keep`
    writes it out, for tests)."""

    seed: torch.Tensor
    p: float
    cols: int


def _launch_gemm(x, weight, bias, h, lowrank_B, d, bvec, scale, y, c=None, dropout=None, dropout_on=None):
    has_main, has_lowrank, accumulate = x is not None, h is not None, c is not None
    M, N = y.shape
    if M == 0 or N == 0:
        return y
    bias, d, bvec = contiguous_vector(bias), contiguous_vector(d), contiguous_vector(bvec)
    dummy = lowrank_B if weight is None else weight  # never read: its constexpr flag is off
    x_ = x if has_main else dummy
    w_ = weight if has_main else dummy
    h_ = h if has_lowrank else dummy
    lb = lowrank_B if has_lowrank else dummy
    K = x.shape[1] if has_main else 0
    R = h.shape[1] if has_lowrank else 0

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    c_ = c if accumulate else y
    drop = dropout if dropout is not None and dropout.p > 0 else None
    if drop is not None:
        kernel, prune = _fused_gemm_dropout_kernel, _prune_dropout_configs
    else:
        kernel = _fused_gemm_accumulate_kernel if accumulate and c is y else _fused_gemm_kernel
        prune = _prune_gemm_configs
    run_tuned(
        kernel, grid, y, x_, w_, bias if bias is not None else dummy, h_, d if d is not None else dummy, lb,
        bvec if bvec is not None else dummy, c_, y, drop.seed if drop else dummy,
        M, N, K, R, float(scale), m_bucket(M),
        drop.p if drop else 0.0, 1.0 / (1.0 - drop.p) if drop else 1.0, drop.cols if drop else 0,
        x_.stride(0), x_.stride(1), w_.stride(0), w_.stride(1),
        h_.stride(0), h_.stride(1), lb.stride(0), lb.stride(1),
        c_.stride(0), c_.stride(1), y.stride(0), y.stride(1),
        HAS_MAIN=has_main, HAS_BIAS=bias is not None, HAS_LOWRANK=has_lowrank, HAS_D=d is not None,
        HAS_BVEC=bvec is not None, ACCUMULATE=accumulate, C_IS_Y=c_ is y,
        DROP_X=drop is not None and dropout_on == "x", DROP_W=drop is not None and dropout_on == "w",
        DROP_LOWRANK=drop is not None and dropout_on == "lowrank",
        INPUT_PRECISION=input_precision(dummy.dtype), DOT_IN_FP32=dot_in_fp32(dummy.dtype),
        prune=prune,
    )
    return y


# ------------------------------------------------------------------ Hopper: TMA, persistent tiles


@triton.jit
def _fused_gemm_tma(
    x_desc, w_desc, h_desc, lb_desc, bias_ptr, y_ptr,
    M, N, K, R, M_BUCKET, NUM_SMS, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, W_KN: tl.constexpr, LB_KN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``y[M, N] = x[M, K] w^T + h[M, R] lb^T + bias[N]`` for Hopper: every operand arrives as a
    tensor descriptor (TMA loads, zero-padded past the edges) and ``NUM_SMS`` programs loop over
    the output tiles in grouped order (a persistent schedule: no tail wave, the next tile's loads
    overlap this tile's epilogue). The low-rank segment is ``R`` more K steps on the second
    descriptor pair, ``BLOCK_R`` wide; its scalings (``scale * d`` on ``h``, ``b`` on ``lb``) are
    applied by the launcher, which rounds them to the input dtype exactly where the pointer kernel does.

    ``w_desc`` covers ``w`` as (N, K) (``W_KN=False``: the forward's ``x W^T``) or as (K, N)
    (``W_KN=True``: ``grad_x = g W`` reads ``W`` that way); ``lb_desc`` likewise (``LB_KN``).
    """
    pid0 = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    dot_dtype: tl.constexpr = tl.float32 if DOT_IN_FP32 else x_desc.dtype
    for tile in tl.range(pid0, num_pid_m * num_pid_n, NUM_SMS, flatten=True):
        pid_m, pid_n = grouped_program_ids(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            x_tile = x_desc.load([off_m, k * BLOCK_K]).to(dot_dtype)
            if W_KN:
                w_tile = w_desc.load([k * BLOCK_K, off_n]).to(dot_dtype)
            else:
                w_tile = w_desc.load([off_n, k * BLOCK_K]).to(dot_dtype).T
            acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
        if HAS_LOWRANK:
            for r in range(0, tl.cdiv(R, BLOCK_R)):
                h_tile = h_desc.load([off_m, r * BLOCK_R]).to(dot_dtype)
                if LB_KN:
                    lb_tile = lb_desc.load([r * BLOCK_R, off_n]).to(dot_dtype)
                else:
                    lb_tile = lb_desc.load([off_n, r * BLOCK_R]).to(dot_dtype).T
                acc = tl.dot(h_tile, lb_tile, acc, input_precision=INPUT_PRECISION)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])


def _tma_family(dtype: torch.dtype, precision: str) -> str | None:
    """The TMA_CONFIGS family serving ``dtype`` at ``precision``, None where the variant does not run."""
    family = gemm_family(dtype, precision)
    return family if family in TMA_CONFIGS else None


def _prune_tma_configs(candidates, named_args, **kwargs):
    """``early_config_prune``: the TMA_CONFIGS family of the descriptors' dtype and precision."""
    if INTERPRET:
        return candidates
    family = TMA_CONFIGS[_tma_family(named_args["x_desc"].base.dtype, kwargs["INPUT_PRECISION"])]
    return [config for config in candidates if any(config is mine for mine in family)]


def _tma_hook(nargs):
    """Sets each descriptor's block shape to the config's tiles before a launch (the descriptors
    are built once per call, before the autotuner picks a config)."""
    block_m, block_n, block_k, block_r = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"], nargs["BLOCK_R"]
    nargs["x_desc"].block_shape = [block_m, block_k]
    nargs["w_desc"].block_shape = [block_k, block_n] if nargs["W_KN"] else [block_n, block_k]
    nargs["h_desc"].block_shape = [block_m, block_r]
    nargs["lb_desc"].block_shape = [block_r, block_n] if nargs["LB_KN"] else [block_n, block_r]


def _with_hook(configs):
    for config in configs:
        config.pre_hook = _tma_hook
    return configs


_fused_gemm_tma_kernel = triton.autotune(
    configs=_with_hook(INTERPRET_TMA_CONFIGS if INTERPRET else [c for family in TMA_CONFIGS.values() for c in family]),
    key=["M_BUCKET", "N", "K", "R", "INPUT_PRECISION", "W_KN"],
    prune_configs_by={"early_config_prune": _prune_tma_configs},
)(_fused_gemm_tma)


def tma_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`fused_gemm` can read ``x`` (M, K) and ``weight`` (N, K), any view, through tensor
    descriptors: a 16-bit or TF32 dot family, one unit stride each (``weight`` either way round),
    16-byte aligned base addresses and leading strides (TMA's rules), a CUDA device of compute
    capability 9 or later (or the interpreter)."""
    if _tma_family(x.dtype, input_precision(x.dtype)) is None or x.dtype != weight.dtype:
        return False
    if not INTERPRET and not (x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9):
        return False
    size = x.element_size()
    if x.stride(1) != 1 or 1 not in weight.stride():
        return False
    lead_w = weight.stride(0) if weight.stride(1) == 1 else weight.stride(1)
    return all(v % 16 == 0 for v in (x.data_ptr(), weight.data_ptr(), x.stride(0) * size, lead_w * size))


def fused_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    lowrank_B: torch.Tensor | None = None,
    d: torch.Tensor | None = None,
    bvec: torch.Tensor | None = None,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    tma: bool = False,
    dropout: Dropout | None = None,
    dropout_on: str = "x",
) -> torch.Tensor:
    """``x @ weight.T + bias + bvec * ((scale * d * h) @ lowrank_B.T)`` in one launch.

    x: (M, K), weight: (N, K), bias/bvec: (N,), h: (M, R), lowrank_B: (N, R), d: (R,).
    Any strides (pass a transposed view to multiply by a matrix instead of its transpose).
    Writes into ``out`` (M, N), any strides, when given; else returns a new contiguous (M, N)
    tensor of ``out_dtype`` (default ``x.dtype``). ``tma``: use the Hopper variant (tensor
    descriptors, persistent tiles) where :func:`tma_supported` says it can read ``x`` and
    ``weight``; the pointer kernel otherwise. ``dropout``: drop elements of ``x``
    (``dropout_on="x"``, ``x`` is the adapter's input) or of ``weight`` (``dropout_on="w"``,
    ``weight`` is the transposed view of the adapter's input), :class:`Dropout`.
    """
    if dropout_on not in ("x", "w"):
        raise ValueError(f"dropout_on must be 'x' or 'w', got {dropout_on!r}")
    y = out if out is not None else torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=out_dtype or x.dtype)
    if tma and dropout is None and y.dtype == x.dtype and tma_supported(x, weight):
        return _launch_gemm_tma(x, weight, bias, h, lowrank_B, d, bvec, scale, y)
    return _launch_gemm(x, weight, bias, h, lowrank_B, d, bvec, scale, y, dropout=dropout, dropout_on=dropout_on)


def _tma_ready(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 2-D ``t`` in ``dtype`` as a tensor descriptor can cover it: a unit last stride and
    16-byte aligned rows and base, its last dimension zero-padded where it must be (the padding
    adds nothing: it meets zeros or falls outside the output). ``t`` itself when it already is."""
    per_16_bytes = 16 // torch.empty((), dtype=dtype).element_size()
    if t.dtype == dtype and t.stride(1) == 1 and t.stride(0) % per_16_bytes == 0 and t.data_ptr() % 16 == 0:
        return t
    cols = t.shape[1]
    out = torch.zeros((t.shape[0], -(-cols // per_16_bytes) * per_16_bytes), device=t.device, dtype=dtype)
    out[:, :cols] = t
    return out


def _launch_gemm_tma(x, weight, bias, h, lowrank_B, d, bvec, scale, y):
    M, N = y.shape
    if M == 0 or N == 0:
        return y
    K = x.shape[1]
    dtype = x.dtype
    bias = contiguous_vector(bias)
    w_kn = weight.stride(1) != 1  # a (N, K) view of a row-major (K, N) tensor: read it as (K, N)
    has_lowrank = h is not None
    lb_kn = False
    if has_lowrank:
        # The pointer kernel scales h (in float32) and lb before rounding them to the input dtype
        # for the dot; here the same products are formed first and rounded the same way.
        acc = acc_dtype(dtype)
        h_s = _tma_ready(h.to(acc) * (scale if d is None else d.to(acc) * scale), dtype)
        lb_kn = lowrank_B.stride(1) != 1 and lowrank_B.stride(0) == 1  # A^T of grad_x: read A (R, N)
        lb = lowrank_B.T if lb_kn else lowrank_B
        if bvec is not None:
            lb = lb.to(acc) * (bvec.to(acc)[None, :] if lb_kn else bvec.to(acc)[:, None])
        lb = _tma_ready(lb, dtype)
    else:
        h_s = lb = torch.zeros((16, 16), device=y.device, dtype=dtype)  # never read
    # Block shapes are placeholders: _tma_hook sets each config's tiles before its launch.
    descs = [TensorDescriptor.from_tensor(t, [16, 16]) for t in (x, weight.T if w_kn else weight, h_s, lb)]
    num_sms = torch.cuda.get_device_properties(y.device).multi_processor_count if y.is_cuda else 4

    def grid(meta):
        return (min(num_sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    run_tuned(
        _fused_gemm_tma_kernel, grid, y, *descs, bias if bias is not None else y, y,
        M, N, K, h.shape[1] if has_lowrank else 0, m_bucket(M), num_sms, y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_LOWRANK=has_lowrank, W_KN=w_kn, LB_KN=lb_kn,
        INPUT_PRECISION=input_precision(dtype), DOT_IN_FP32=dot_in_fp32(dtype), BLOCK_R=16,
        prune=_prune_tma_configs,
    )
    return y


def add_lowrank_(
    y: torch.Tensor,
    h: torch.Tensor,
    lowrank_B: torch.Tensor,
    d: torch.Tensor | None = None,
    bvec: torch.Tensor | None = None,
    scale: float = 1.0,
    *,
    base: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dropout: Dropout | None = None,
) -> torch.Tensor:
    """``y = base + bias + bvec * ((scale * d * h) @ lowrank_B.T)``, one launch; returns ``y``.

    ``base`` (M, N) defaults to ``y`` itself (an in-place add). The split form of
    :func:`fused_gemm`: the base GEMM runs in cuBLAS, this kernel adds the low-rank path (the
    base is read once more: M * N extra element moves each way). With a float32 ``base`` and a
    16-bit ``y`` the sum is rounded once. ``dropout``: ``y`` has the shape of an adapter input
    ``X`` and the low-rank product is masked as ``X`` is (:class:`Dropout`; ``grad_x`` of dropout).
    """
    return _launch_gemm(None, None, bias, h, lowrank_B, d, bvec, scale, y, c=y if base is None else base,
                        dropout=dropout, dropout_on="lowrank")


@triton.jit
def _dropout_keep_kernel(seed_ptr, keep_ptr, total, drop_p, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(tl.load(seed_ptr), offs) >= drop_p
    tl.store(keep_ptr + offs, keep.to(tl.int8), mask=offs < total)


def dropout_keep(dropout: Dropout, rows: int) -> torch.Tensor:
    """The mask :class:`Dropout` draws inside the kernels for an adapter input of (``rows``,
    ``dropout.cols``): True where an element is kept. Written out for tests (the kernels never
    write it)."""
    total = rows * dropout.cols
    keep = torch.empty(total, device=dropout.seed.device, dtype=torch.int8)
    block = 1 << 16 if INTERPRET else 1024  # the interpreter pays per program, not per element
    if total > 0:
        _dropout_keep_kernel[(triton.cdiv(total, block),)](dropout.seed, keep, total, float(dropout.p), BLOCK=block)
    return keep.view(rows, dropout.cols).bool()


def lowrank_grads(
    g: torch.Tensor,
    xa: torch.Tensor,
    lowrank_B: torch.Tensor,
    d: torch.Tensor | None,
    bvec: torch.Tensor | None,
    scale: float,
    need_grad_d: bool,
    need_grad_b: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Low-rank part of the backward of ``y = ... + bvec * ((scale * d * xa) @ lowrank_B.T)``.

    g: (M, N) output gradient, xa: (M, R) saved ``x @ A.T``, lowrank_B: (N, R), d: (R,), bvec: (N,).
    Returns, in the accumulation dtype (fp32, or fp64 for fp64 inputs): ``gh`` (M, R), the
    gradient with respect to ``x @ A.T``; ``grad_d`` (R,) or None; ``grad_b`` (N,) or None.
    """
    M, N = g.shape
    R = xa.shape[1]
    d, bvec = contiguous_vector(d), contiguous_vector(bvec)
    block_m, block_r = grad_blocks(R)
    m_blocks, r_blocks = triton.cdiv(M, block_m), triton.cdiv(R, block_r)
    acc = acc_dtype(lowrank_B.dtype)
    gh = torch.empty((M, R), device=g.device, dtype=acc)
    grad_d_part = torch.zeros((m_blocks, R) if need_grad_d else (1,), device=g.device, dtype=acc)
    grad_b_part = torch.zeros((m_blocks * r_blocks, N) if need_grad_b else (1,), device=g.device, dtype=acc)
    if M > 0:
        dummy = xa
        run_tuned(
            _lowrank_grad_kernel, (m_blocks * r_blocks,), g,
            g, xa, d if d is not None else dummy, lowrank_B, bvec if bvec is not None else dummy,
            gh, grad_d_part, grad_b_part,
            M, N, R, float(scale), m_bucket(M),
            g.stride(0), g.stride(1), xa.stride(0), xa.stride(1),
            lowrank_B.stride(0), lowrank_B.stride(1), gh.stride(0), gh.stride(1),
            HAS_D=d is not None, HAS_BVEC=bvec is not None, NEED_GRAD_D=need_grad_d, NEED_GRAD_B=need_grad_b,
            INPUT_PRECISION=input_precision(lowrank_B.dtype), DOT_IN_FP32=dot_in_fp32(lowrank_B.dtype),
            BLOCK_M=block_m, BLOCK_R=block_r,
        )
    grad_d = grad_d_part.sum(0).mul_(scale) if need_grad_d else None
    grad_b = grad_b_part.sum(0) if need_grad_b else None
    return gh, grad_d, grad_b
