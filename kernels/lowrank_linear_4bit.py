"""The fused linear + low-rank GEMM on a 4-bit base weight (QLoRA): W is read as 4-bit codes and
dequantized tile by tile in registers, so no 16- or 32-bit copy of W ever exists. The dequantized
tile is the dot's first operand (the kernel computes y^T), which tensor cores read from registers.

    y      = x W^T + bias + b * ((scale * d * h) B^T)          (forward, h = x A^T)
    grad_x = g W   + gh A                                      (backward, the same kernel, W_T=True)

The weight is in bitsandbytes' 4-bit layout (``bitsandbytes.functional.quantize_4bit``): the
row-major (out, in) matrix flattened, element ``e`` stored in byte ``e // 2``, the high nibble for
even ``e`` and the low nibble for odd ``e``; one float32 ``absmax`` per ``QBLOCK`` consecutive
elements; a 16-entry float32 code book (NF4 or FP4). With double quantization (``NESTED``) the
absmax is itself one uint8 index per block into a 256-entry code book, times a float32 absmax per
``NESTED_BLOCK`` blocks, plus an offset. An element is ``code[nibble] * absmax[e // QBLOCK]``,
computed in float32 and rounded to the compute dtype: bit for bit what
``bitsandbytes.functional.dequantize_4bit`` returns (the nested absmax as bitsandbytes forms it,
``code2[q] * absmax2`` rounded, then ``+ offset`` rounded: the launches pass
``enable_fp_fusion=False`` so that the compiler does not contract the two into one FMA).

Kernel-local names follow ``kernels/lowrank_linear.py``: M rows (tokens), N output columns, K
reduction, R rank. ``W_COLS`` is W's row length (in_features), the direction the codes are packed
in: the forward reduces along it, ``grad_x`` (``W_T``) produces along it.
"""

import torch
import triton
import triton.language as tl

from pefttriton.kernels.launch import (
    INTERPRET,
    contiguous_vector,
    dot_in_fp32,
    gemm_family,
    gemm_config,
    grouped_program_ids,
    input_precision,
    m_bucket,
    run_tuned,
)

# Autotune configs per dot family, for the ALIGNED layout (below) that real models' layers have.
# Dequantizing a W tile holds it in float32 registers (plus its byte tile) beside the GEMM's, so
# these are the tiles that compile without spills for sm_80 and sm_90 at every call site (forward
# LoRA / VeRA and grad_x, nested absmax or not, blocksize 32 / 64 / 128; the helper's compile
# check): 128 x 128 needs K = 32 with 8 warps (K = 64 spills 8-88 bytes on sm_80), 64 x 128 and
# 128 x 64 need 8 warps at K = 64, and the 64 x 64 x 16 IEEE fp32 tile spills on sm_90.
GEMM_CONFIGS = {
    "16-bit": [
        gemm_config(128, 128, 32, 8, 3),
        gemm_config(64, 128, 64, 8, 3),
        gemm_config(128, 64, 64, 8, 3),
        gemm_config(64, 64, 32, 4, 3),
        gemm_config(32, 128, 64, 4, 3),
        gemm_config(32, 64, 32, 4, 3),
    ],
    "fp32": [
        gemm_config(32, 64, 32, 4, 3),
        gemm_config(64, 32, 16, 4, 2),
    ],
    "tf32": [
        gemm_config(64, 128, 32, 8, 3),
        gemm_config(64, 64, 32, 4, 3),
        gemm_config(32, 64, 32, 4, 3),
    ],
}
# The PAIRED and UNPAIRED layouts (in_features not a multiple of the blocksize: tiny or odd
# layers) gather an absmax per byte or per element, with 64-bit indices: small tiles only.
SMALL_CONFIGS = {
    "16-bit": [gemm_config(32, 64, 32, 4, 3)],
    "fp32": [gemm_config(32, 32, 16, 4, 2)],
    "tf32": [gemm_config(32, 64, 32, 4, 3)],
}
INTERPRET_GEMM_CONFIGS = [gemm_config(32, 32, 32, 4, 1)]


def config_family(dtype: torch.dtype, precision: str, layout_: int, blocksize: int = 64, transposed: bool = False) -> list:
    """The configs the autotuner may pick for inputs of ``dtype`` at ``precision``, W's ``layout_`` and
    ``blocksize``. A forward K tile wider than a block (blocksize 32, rare) holds several absmax
    groups per row and spills on sm_80: such a forward keeps the tiles whose K fits in a block."""
    family = (GEMM_CONFIGS if layout_ == ALIGNED else SMALL_CONFIGS)[gemm_family(dtype, precision)]
    if not transposed:
        fitting = [c for c in family if c.kwargs["BLOCK_K"] <= blocksize]
        family = fitting or family
    return family


def _prune_configs(candidates, named_args, **kwargs):
    """``early_config_prune``: the configs of :func:`config_family` (the interpreter keeps its one)."""
    if INTERPRET:
        return candidates
    family = config_family(named_args["x_ptr"].dtype, kwargs["INPUT_PRECISION"], kwargs["LAYOUT"],
                           kwargs["QBLOCK"], kwargs["W_T"])
    return [config for config in candidates if any(config is mine for mine in family)]


# How a W tile finds its codes and absmaxes (:func:`layout` picks the first that holds):
ALIGNED = 0  # every row holds whole quantization blocks (in_features % blocksize == 0, a power of
#              two): one absmax per tile row, or per row and block when a tile spans several.
PAIRED = 1  # in_features even: rows start on a byte; one absmax gathered per byte.
UNPAIRED = 2  # anything else: every element finds its byte, nibble and absmax.


def layout(in_features: int, blocksize: int) -> int:
    """W's layout constant for the kernel: ALIGNED, PAIRED or UNPAIRED."""
    if in_features % blocksize == 0 and blocksize & (blocksize - 1) == 0:
        return ALIGNED
    return PAIRED if in_features % 2 == 0 else UNPAIRED


@triton.jit
def _dot_operand(t, dtype: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """The tile ``t`` (float32, or ``dtype``) rounded to the input ``dtype`` as the dot reads it.

    Compiled: ``t.to(dtype)``. Interpreted bf16 (DOT_IN_FP32, dots in float32): float32 holding the
    bf16 value, rounded to nearest even with integer operations, because the interpreter's float32
    -> bf16 cast truncates (triton 3.9); so the interpreter sees the operands a GPU sees.
    """
    if DOT_IN_FP32:
        bits = t.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return t.to(dtype)


@triton.jit
def _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask, NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr):
    """float32 absmax of the 4-bit blocks ``block`` (any shape): stored, or dequantized (nested)."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scaled = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // NESTED_BLOCK, mask=mask, other=0.0)
        return scaled + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def dequantize_4bit_tile(
    q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    rows, col0, mask_rows, W_COLS,
    QBLOCK: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, LAYOUT: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """``W[rows, col0:col0 + COLS]`` (ROWS, COLS) in float32.

    ``rows`` (ROWS,) int64 row indices, ``col0`` the first column, a multiple of COLS (a power of
    two). ALIGNED and PAIRED read the tile as (ROWS, COLS / 2) bytes and interleave the two
    nibbles back into columns; ALIGNED takes one absmax per (row, block) (COLS / QBLOCK of them per
    row, or one when COLS <= QBLOCK: a tile then lies inside one block). Outside W the values are
    finite but not zero (nested: the offset); the callers meet them with zeros of x or store
    nothing there.
    """
    if LAYOUT == 2:  # UNPAIRED
        cols = col0 + tl.arange(0, COLS)
        elem = rows[:, None] * W_COLS + cols[None, :]
        mask = mask_rows[:, None] & (cols < W_COLS)[None, :]
        packed = tl.load(q_ptr + (elem >> 1), mask=mask, other=0).to(tl.int32)
        nibble = (packed >> (4 - 4 * (elem & 1)).to(tl.int32)) & 15
        scale = _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, elem // QBLOCK, mask, NESTED, NESTED_BLOCK)
        return tl.load(code_ptr + nibble) * scale
    else:
        half = col0 // 2 + tl.arange(0, COLS // 2)
        mask = mask_rows[:, None] & (half < W_COLS // 2)[None, :]
        packed = tl.load(q_ptr + rows[:, None] * (W_COLS // 2) + half[None, :], mask=mask, other=0).to(tl.int32)
        if LAYOUT == 0:  # ALIGNED
            if COLS <= QBLOCK:  # the tile lies inside one block per row: a (ROWS,) vector
                block = rows * (W_COLS // QBLOCK) + col0 // QBLOCK  # col0 < W_COLS: every tile starts inside W
                scale = _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask_rows, NESTED, NESTED_BLOCK)[:, None]
            else:
                GROUPS: tl.constexpr = COLS // QBLOCK
                group = col0 // QBLOCK + tl.arange(0, GROUPS)
                mask_g = mask_rows[:, None] & (group < W_COLS // QBLOCK)[None, :]
                block = rows[:, None] * (W_COLS // QBLOCK) + group[None, :]
                scale = _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask_g, NESTED, NESTED_BLOCK)
                scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (ROWS, GROUPS, COLS // 2 // GROUPS)), (ROWS, COLS // 2))
        else:
            byte_idx = rows[:, None] * (W_COLS // 2) + half[None, :]
            scale = _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, byte_idx // (QBLOCK // 2), mask, NESTED, NESTED_BLOCK)
        high = tl.load(code_ptr + (packed >> 4)) * scale  # element 2j: the high nibble
        low = tl.load(code_ptr + (packed & 15)) * scale
        return tl.interleave(high, low)


@triton.jit
def _fused_gemm_4bit(
    x_ptr, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    bias_ptr, h_ptr, d_ptr, lb_ptr, bvec_ptr, y_ptr,
    M, N, K, R, W_COLS, scale, M_BUCKET,
    stride_xm, stride_xk, stride_hm, stride_hr, stride_lbn, stride_lbr, stride_ym, stride_yn,
    W_T: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_D: tl.constexpr,
    HAS_BVEC: tl.constexpr, QBLOCK: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr,
    LAYOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] = x[M, K] op(W) + bias[N] + bvec[N] * ((scale * d[R] * h[M, R]) lb[N, R]^T), as y^T.

    ``op(W) = W^T`` with W (N, K) (``W_T=False``: the forward) or ``W`` with W (K, N) (``W_T=True``:
    ``grad_x = g W``); W is the 4-bit weight, dequantized a (BLOCK_K, BLOCK_N) tile at a time into
    the dot's dtype. The low-rank segment is the dense kernel's (``_fused_gemm``): more K steps
    over the rank, ``scale * d`` on h, ``bvec`` on lb, the sum rounded once.
    """
    pid_m, pid_n = grouped_program_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    dot_dtype: tl.constexpr = tl.float32 if DOT_IN_FP32 else x_ptr.dtype.element_ty

    # The kernel computes y^T (BLOCK_N, BLOCK_M) = op(W)^T x^T: the dequantized W tile is the dot's
    # first operand, which the tensor cores read from registers (wgmma on sm_90), so it never goes
    # through shared memory. As the second operand, a TF32 wgmma needs it transposed in shared
    # memory, which triton 3.9 fails to compile for grad_x (TritonGPUOptimizeDotOperands), and the
    # forward's 16-bit tiles held 20-60 more registers per thread at 128 x 128 (sm_90, measured).
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        if W_T:  # W (K, N): rows along the reduction, the packed columns along the output
            w_tile = dequantize_4bit_tile(
                q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                (k * BLOCK_K + offs_k).to(tl.int64), pid_n * BLOCK_N, offs_k < k_left, W_COLS,
                QBLOCK, NESTED, NESTED_BLOCK, LAYOUT, BLOCK_K, BLOCK_N,
            )
            w_tile = tl.trans(w_tile)
        else:  # W (N, K): the packed columns along the reduction
            w_tile = dequantize_4bit_tile(
                q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                offs_n.to(tl.int64), k * BLOCK_K, mask_n, W_COLS,
                QBLOCK, NESTED, NESTED_BLOCK, LAYOUT, BLOCK_N, BLOCK_K,
            )
        w_tile = _dot_operand(w_tile, x_ptr.dtype.element_ty, DOT_IN_FP32)
        acc = tl.dot(w_tile, tl.trans(x_tile.to(dot_dtype)), acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk

    if HAS_LOWRANK:  # acc += (bvec * lb) (scale * d * h)^T, the rank as more K steps
        h_ptrs = h_ptr + rows[None, :] * stride_hm + offs_k[:, None] * stride_hr
        lb_ptrs = lb_ptr + offs_n[:, None] * stride_lbn + offs_k[None, :] * stride_lbr
        if HAS_BVEC:
            bvec = tl.load(bvec_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        for r in range(0, tl.cdiv(R, BLOCK_K)):
            mask_r = offs_k < R - r * BLOCK_K
            h_tile = tl.load(h_ptrs, mask=mask_r[:, None] & mask_m[None, :], other=0.0).to(tl.float32)  # (K, M)
            if HAS_D:
                d = tl.load(d_ptr + r * BLOCK_K + offs_k, mask=mask_r, other=0.0).to(tl.float32)
                h_tile = h_tile * (d * scale)[:, None]
            else:
                h_tile = h_tile * scale
            lb_tile = tl.load(lb_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # (N, K)
            if HAS_BVEC:
                lb_tile = lb_tile.to(tl.float32) * bvec[:, None]
            acc = tl.dot(_dot_operand(lb_tile, x_ptr.dtype.element_ty, DOT_IN_FP32),
                         _dot_operand(h_tile, x_ptr.dtype.element_ty, DOT_IN_FP32), acc, input_precision=INPUT_PRECISION)
            h_ptrs += BLOCK_K * stride_hr
            lb_ptrs += BLOCK_K * stride_lbr

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_n[:, None] * stride_yn + rows[None, :] * stride_ym
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


_fused_gemm_4bit_kernel = triton.autotune(
    configs=INTERPRET_GEMM_CONFIGS if INTERPRET else [c for table in (GEMM_CONFIGS, SMALL_CONFIGS) for family in table.values() for c in family],
    key=["M_BUCKET", "N", "K", "R", "INPUT_PRECISION", "W_T", "QBLOCK", "NESTED", "LAYOUT"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_fused_gemm_4bit)


def fused_gemm_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    bias: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    lowrank_B: torch.Tensor | None = None,
    d: torch.Tensor | None = None,
    bvec: torch.Tensor | None = None,
    scale: float = 1.0,
    transposed: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias + bvec * ((scale * d * h) @ lowrank_B.T)`` (``transposed``: ``x @ W + ...``)
    in one launch, with W (m, n) = ``shape`` read in its 4-bit layout.

    x: (M, n) (``transposed``: (M, m)), any strides, float16 / bfloat16 / float32 (the compute dtype:
    W's tiles are dequantized into it). packed: (ceil(m * n / 2),) uint8, contiguous. absmax:
    (ceil(m * n / blocksize),) float32, or uint8 with ``absmax2`` (ceil(blocks / nested_blocksize),)
    float32, ``code2`` (256,) float32 and ``offset`` () float32 (double quantization). code: (16,)
    float32. blocksize: an even power of two. bias/bvec: (N,), h: (M, R), lowrank_B: (N, R) any
    strides, d: (R,); N = m (n when ``transposed``). Returns ``out`` (M, N), or a new tensor of x's dtype.
    """
    m, n = shape
    N, K = (n, m) if transposed else (m, n)
    M = x.shape[0]
    y = out if out is not None else torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    nested = absmax2 is not None
    bias, d, bvec = contiguous_vector(bias), contiguous_vector(d), contiguous_vector(bvec)
    has_lowrank = h is not None
    dummy = absmax if not nested else absmax2  # never read: its constexpr flag is off
    h_ = h if has_lowrank else x
    lb = lowrank_B if has_lowrank else x

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    run_tuned(
        _fused_gemm_4bit_kernel, grid, y,
        x, packed, absmax, code, absmax2 if nested else dummy, code2 if nested else dummy,
        offset if nested else dummy,
        bias if bias is not None else dummy, h_, d if d is not None else dummy, lb,
        bvec if bvec is not None else dummy, y,
        M, N, K, h.shape[1] if has_lowrank else 0, n, float(scale), m_bucket(M),
        x.stride(0), x.stride(1), h_.stride(0), h_.stride(1), lb.stride(0), lb.stride(1), y.stride(0), y.stride(1),
        W_T=transposed, HAS_BIAS=bias is not None, HAS_LOWRANK=has_lowrank, HAS_D=d is not None,
        HAS_BVEC=bvec is not None, QBLOCK=blocksize, NESTED=nested, NESTED_BLOCK=nested_blocksize,
        LAYOUT=layout(n, blocksize), INPUT_PRECISION=input_precision(x.dtype), DOT_IN_FP32=dot_in_fp32(x.dtype),
        enable_fp_fusion=False, prune=_prune_configs,
    )
    return y
