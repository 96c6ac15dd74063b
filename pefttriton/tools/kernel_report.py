"""Compile every Triton kernel of pefttriton for real GPUs, on any machine, and report its resources.

    python -m pefttriton.tools.kernel_report [--targets 80,90] [--dtypes fp16,bf16,fp32,tf32] [--json FILE]
    python -m pefttriton.tools.kernel_report --update [--workers 2]     # rewrite the committed report
    python -m pefttriton.tools.kernel_report --sample results/kernel-report.json [--json FILE]

Triton compiles ahead of time for a named target without a GPU: ``triton.compile`` turns each
kernel, at each shipped autotune config and each way the ops launch it, into a cubin for sm_80
(A100) and sm_90 (H100); ``cuobjdump`` (shipped in the triton wheel) then reads registers and
stack bytes per thread. STACK > 0 means register spills. Tensor-core use is read off the PTX
(``mma.sync`` on sm_80, ``wgmma`` on sm_90). The interpreter accepts code the compiler rejects, so
this report is the check that the kernels are real GPU code. Each row also gives the occupancy its
registers, shared memory and warps allow (:func:`occupancy`).

Launches are specialised as on a typical GPU run: pointers and the leading dimensions 16-byte
aligned, unit strides as constants, the rank not assumed to be a multiple of 16. Shapes that are
not multiples of 16 (a hidden size of 13, an odd token count) compile another specialisation, with
no divisibility hint on any integer argument: every call site is also compiled so, once per dtype
and target, at its largest tile (rows marked ``unaligned``).

Compiling everything takes minutes, so the report is committed (``--update`` writes
``results/kernel-report.json`` and the generated part of ``results/kernel-report.md``) with a
fingerprint of what it covers: the hash of the kernel sources (``kernels/*.py``) and of every job's
full specification (call site, config, dtype, target, signature, constants, alignment hints). The
test suite checks that fingerprint against today's code, and compiles only a sample afresh
(``--sample``: the rows nearest to spilling, plus a tile that must spill).
"""

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import tokenize
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pefttriton.kernels import lorma_pi as lp
from pefttriton.kernels import lowrank_linear as lk
from pefttriton.kernels import lowrank_linear_4bit as l4
from pefttriton.kernels import vera_bank as vb

_KERNEL_MODULES = {"lowrank_linear": lk, "lorma_pi": lp, "vera_bank": vb, "lowrank_linear_4bit": l4}
KERNELS_DIR = Path(lk.__file__).resolve().parent
"""The kernel sources (``kernels/`` of the repository, installed as ``pefttriton.kernels``)."""
RESULTS_DIR = Path(__file__).resolve().parents[2] / "results"
"""Where ``--update`` writes the committed report: ``results/`` of the repository checkout."""
REPORT_JSON = "kernel-report.json"
REPORT_MD = "kernel-report.md"
UPDATE_COMMAND = "python -m pefttriton.tools.kernel_report --update"

TARGETS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32", "tf32")
_TRITON_TYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
# Largest shared memory one block may use: 163 KiB on A100 (sm_80), 227 KiB on H100 (sm_90).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# Per-SM resources of sm_80 and sm_90 (CUDA C++ Programming Guide, compute capability tables; the
# allocation units are the CUDA occupancy calculator's).
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256  # registers are allocated per warp, in units of 256
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}  # with the largest shared-memory carveout
SHARED_UNIT = 128  # shared memory is allocated per block, in units of 128 bytes
SHARED_RESERVED = 1024  # the CUDA runtime reserves 1 KiB of shared memory per block
MAX_BLOCKS_PER_SM = 32
MAX_WARPS_PER_SM = 64  # 2048 threads


def _ceil_to(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(registers: int, shared_bytes: int, num_warps: int, cc: int) -> tuple[int, str]:
    """Resident blocks per SM for a kernel, and the resource that limits them (sm_80, sm_90).

    With R registers per thread, S bytes of shared memory and W warps per block::

        by registers     floor(floor(65536 / ceil_256(32 R)) / W)   registers allocated per warp
        by shared memory floor(S_SM / (ceil_128(S) + 1024))         S_SM = 164 KiB (sm_80), 228 KiB (sm_90)
        by warps         floor(64 / W)                              2048 threads per SM
        by blocks        32

    The blocks per SM are the least of the four (the first limit named on a tie); the warps per SM
    are blocks x W, out of 64. ``ceil_u(v)`` rounds v up to a multiple of u. This is the occupancy
    calculator's rule, for the largest shared-memory carveout (the driver's choice on a real run
    may leave less).
    """
    limits = {
        "registers": (REGISTERS_PER_SM // _ceil_to(32 * registers, REGISTER_UNIT)) // num_warps,
        "shared memory": SHARED_PER_SM[cc] // (_ceil_to(shared_bytes, SHARED_UNIT) + SHARED_RESERVED),
        "warps": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
    }
    limit = min(limits, key=limits.get)
    return limits[limit], limit


@dataclass(frozen=True)
class Variant:
    """One way the ops launch a kernel: which flags are on, which strides are 1, pointer dtypes."""

    kernel: str  # attribute name in the module below
    name: str  # the call site
    flags: tuple  # (name, value) constexpr flags
    unit_strides: tuple  # stride arguments equal to 1 at this call site
    fp32_pointers: tuple = ()  # pointers that are fp32 whatever the input dtype (saved x A^T, gh, partials)
    block_r: int | None = None  # BLOCK_R of the low-rank backward kernel
    module: str = "lowrank_linear"  # file of pefttriton/kernels/ that defines the kernel
    int_pointers: tuple = ()  # pointers to int32 (the VeRA bank's adapter ids)
    i64_pointers: tuple = ("seed_ptr",)  # pointers to int64 (the dropout seed, where the kernel has one)
    u8_pointers: tuple = ()  # pointers to uint8 (4-bit codes, a double-quantized absmax)
    options: tuple = ()  # (name, value) compile options of the launch beyond warps and stages
    configs: str = "gemm"  # which configs the launch autotunes over: "gemm", "dropout", "tma" or "4bit"
    descriptors: tuple = ()  # (argument, (block key, block key)): tensor descriptors (TMA) and their tiles
    targets: tuple | None = None  # compute capabilities it is launched on (None: every target)
    dtypes: tuple | None = None  # input dtypes it is launched with (None: every dtype)


def _gemm_variants():
    def flags(main, bias, lowrank, d, bvec, accumulate=False, c_is_y=True):
        return (("HAS_MAIN", main), ("HAS_BIAS", bias), ("HAS_LOWRANK", lowrank), ("HAS_D", d),
                ("HAS_BVEC", bvec), ("ACCUMULATE", accumulate), ("C_IS_Y", c_is_y),
                ("DROP_X", False), ("DROP_W", False), ("DROP_LOWRANK", False))

    fwd_strides = ("stride_xk", "stride_wk", "stride_hr", "stride_lbr", "stride_yn")
    # grad_x = g W + gh A reads W and A transposed: unit stride along N, not K.
    grad_x_strides = ("stride_xk", "stride_wn", "stride_hr", "stride_lbn", "stride_yn")
    k = "_fused_gemm_kernel"
    return [
        Variant(k, "forward (VeRA: d, b, bias)", flags(True, True, True, True, True), fwd_strides,
                ("h_ptr", "d_ptr", "bvec_ptr")),
        Variant(k, "forward (LoRA: scale, bias)", flags(True, True, True, False, False), fwd_strides, ("h_ptr",)),
        Variant(k, "down projection x A^T", flags(True, False, False, False, False),
                ("stride_xk", "stride_wk", "stride_yn"), ("y_ptr",)),
        Variant(k, "grad_x = g W + gh A", flags(True, False, True, False, False), grad_x_strides, ("h_ptr",)),
        # strategy "split": cuBLAS computes the base GEMM, this adds the low-rank path into y
        # (float32 / float64: in place; 16-bit: from cuBLAS's float32 output plus the bias, rounded once).
        Variant(k, "split: y += b * (h B^T) (VeRA)", flags(False, False, True, True, True, True),
                ("stride_hr", "stride_lbr", "stride_cn", "stride_yn"), ("h_ptr", "d_ptr", "bvec_ptr")),
        Variant(k, "split: y = base32 + bias + b * (h B^T)", flags(False, True, True, True, True, True, False),
                ("stride_hr", "stride_lbr", "stride_cn", "stride_yn"), ("h_ptr", "d_ptr", "bvec_ptr", "c_ptr")),
        Variant(k, "split: grad_x += gh A", flags(False, False, True, False, False, True),
                ("stride_hr", "stride_lbn", "stride_cn", "stride_yn"), ("h_ptr",)),
    ]


def _dropout_variants():
    """The launches that draw a dropout mask of the adapter's input X in their tiles (their own configs)."""
    def flags(main, lowrank, accumulate, drop):
        return (("HAS_MAIN", main), ("HAS_BIAS", False), ("HAS_LOWRANK", lowrank), ("HAS_D", False),
                ("HAS_BVEC", False), ("ACCUMULATE", accumulate), ("C_IS_Y", True),
                ("DROP_X", drop == "x"), ("DROP_W", drop == "w"), ("DROP_LOWRANK", drop == "lowrank"))

    k = "_fused_gemm_dropout_kernel"
    common = dict(configs="dropout")
    return [
        Variant(k, "dropout: drop(x) A^T", flags(True, False, False, "x"), ("stride_xk", "stride_wk", "stride_yn"),
                ("y_ptr",), **common),
        # grad_A = gh^T drop(x): gh (fp32) and x read transposed
        Variant(k, "dropout: grad_A = gh^T drop(x)", flags(True, False, False, "w"), ("stride_xm", "stride_wn", "stride_yn"),
                ("x_ptr", "y_ptr"), **common),
        Variant(k, "dropout: grad_x += mask * (gh A)", flags(False, True, True, "lowrank"),
                ("stride_hr", "stride_lbn", "stride_yn"), ("h_ptr",), **common),
    ]


def _tma_variants():
    """The Hopper GEMM: every operand a tensor descriptor, a persistent tile loop; sm_90 only, 16-bit and TF32."""
    k = "_fused_gemm_tma_kernel"

    def variant(name, bias, kn):
        w = ("BLOCK_K", "BLOCK_N") if kn else ("BLOCK_N", "BLOCK_K")
        lb = ("BLOCK_R", "BLOCK_N") if kn else ("BLOCK_N", "BLOCK_R")
        return Variant(k, name, (("HAS_BIAS", bias), ("HAS_LOWRANK", True), ("W_KN", kn), ("LB_KN", kn), ("BLOCK_R", 16)),
                       ("stride_yn",), configs="tma", targets=(90,), dtypes=("fp16", "bf16", "tf32"),
                       descriptors=(("x_desc", ("BLOCK_M", "BLOCK_K")), ("w_desc", w),
                                    ("h_desc", ("BLOCK_M", "BLOCK_R")), ("lb_desc", lb)))

    return [variant("TMA forward: x W^T + h (b*B)^T + bias", True, False),
            variant("TMA grad_x = g W + gh A", False, True)]


def _grad_variants():
    k = "_lowrank_grad_kernel"
    strides = ("stride_gn", "stride_xar", "stride_lbr", "stride_ghr")
    fp32 = ("xa_ptr", "d_ptr", "bvec_ptr", "gh_ptr", "grad_d_part_ptr", "grad_b_part_ptr")
    vera = (("HAS_D", True), ("HAS_BVEC", True), ("NEED_GRAD_D", True), ("NEED_GRAD_B", True))
    lora = (("HAS_D", False), ("HAS_BVEC", False), ("NEED_GRAD_D", False), ("NEED_GRAD_B", False))
    variants = []
    for rank in (8, 32, 64):  # one per BLOCK_R the launcher can pick (16, 32, 64)
        block_r = lk.grad_blocks(rank)[1]
        variants.append(Variant(k, f"low-rank grads (VeRA, BLOCK_R={block_r})", vera, strides, fp32, block_r))
        variants.append(Variant(k, f"low-rank grads (LoRA, BLOCK_R={block_r})", lora, strides, fp32, block_r))
    return variants


def _lorma_pi_variants():
    # The launchers upcast the factors: every pointer and dot is fp32 whatever the layer dtype.
    return [
        Variant("_shift_product_kernel", "LoRMA-pi: M = s shift(B A)", (("GROUP_M", 8),), ("stride_br", "stride_am", "stride_on"),
                ("b_ptr", "a_ptr", "out_ptr"), module="lorma_pi"),
        Variant("_shift_grad_b_kernel", "LoRMA-pi: grad_B = s unshift(G) A^T", (("BLOCK_M", lp.GRAD_OUT_BLOCK),),
                ("stride_gn", "stride_am", "stride_pr"), ("g_ptr", "a_ptr", "part_ptr"), module="lorma_pi"),
        Variant("_shift_grad_a_kernel", "LoRMA-pi: grad_A = s B^T unshift(G)", (("BLOCK_N", lp.GRAD_OUT_BLOCK),),
                ("stride_gn", "stride_br", "stride_pn"), ("g_ptr", "b_ptr", "part_ptr"), module="lorma_pi"),
    ]


def _vera_bank_variants():
    # The adapter ids are int32, the b table float32 (the bank's parameters), the split base float32.
    # HAS_H_SCALE is on for float16 only; compiled on for every dtype (one more scalar load).
    k = "_vera_bank_gemm_kernel"
    fp32 = ("bank_b_ptr", "h_scale_ptr")

    def flags(main):
        return (("HAS_MAIN", main), ("HAS_BIAS", True), ("HAS_C", not main), ("HAS_H_SCALE", True))

    return [
        Variant(k, "VeRA bank: x W^T + bias + b[ids] (h B^T)", flags(True),
                ("stride_xk", "stride_wk", "stride_hr", "stride_lbr", "stride_yn"), fp32,
                module="vera_bank", int_pointers=("ids_ptr",)),
        Variant(k, "VeRA bank split: base32 + b[ids] (h B^T)", flags(False),
                ("stride_hr", "stride_lbr", "stride_cn", "stride_yn"), fp32 + ("c_ptr",),
                module="vera_bank", int_pointers=("ids_ptr",)),
    ]


def _4bit_variants():
    """The 4-bit GEMM (QLoRA): forward (LoRA, VeRA) and grad_x, W read in bitsandbytes' layout;
    absmax double-quantized (uint8) or not (fp32); the layout real layers have (ALIGNED) and the
    one every element gathers its own byte and absmax in (UNPAIRED, odd widths)."""
    k = "_fused_gemm_4bit_kernel"
    fp32 = ("code_ptr", "absmax2_ptr", "code2_ptr", "offset_ptr", "h_ptr", "d_ptr", "bvec_ptr")
    sites = (
        ("forward (LoRA)", (("W_T", False), ("HAS_BIAS", True), ("HAS_D", False), ("HAS_BVEC", False)),
         ("stride_xk", "stride_hr", "stride_lbr", "stride_yn")),
        ("forward (VeRA)", (("W_T", False), ("HAS_BIAS", True), ("HAS_D", True), ("HAS_BVEC", True)),
         ("stride_xk", "stride_hr", "stride_lbr", "stride_yn")),
        ("grad_x = g W + gh A", (("W_T", True), ("HAS_BIAS", False), ("HAS_D", False), ("HAS_BVEC", False)),
         ("stride_xk", "stride_hr", "stride_lbn", "stride_yn")),
    )
    out = []
    for layout, nested in ((l4.ALIGNED, True), (l4.ALIGNED, False), (l4.UNPAIRED, True)):
        for site, flags, strides in sites:
            name = f"4-bit {site}, {'aligned' if layout == l4.ALIGNED else 'odd width'}{', nested absmax' if nested else ''}"
            out.append(Variant(
                k, name, flags + (("HAS_LOWRANK", True), ("QBLOCK", 64), ("NESTED", nested), ("NESTED_BLOCK", 256),
                                  ("LAYOUT", layout)),
                strides, fp32 + (() if nested else ("absmax_ptr",)), module="lowrank_linear_4bit",
                u8_pointers=("q_ptr",) + (("absmax_ptr",) if nested else ()), options=(("enable_fp_fusion", False),),
                configs="4bit"))
    return out


def variants() -> list[Variant]:
    """Every (kernel, call site) pair the ops launch."""
    return (_gemm_variants() + _dropout_variants() + _tma_variants() + _grad_variants() + _lorma_pi_variants()
            + _vera_bank_variants() + _4bit_variants())


def _configs(variant: Variant, dtype: str) -> list[triton.Config]:
    """The configs the autotuner may pick for this call site and dtype (``tf32``: fp32 inputs, TF32 dots)."""
    if variant.module == "lorma_pi":
        return lp.CONFIGS[variant.kernel]  # one list: fp32 dots for every input dtype
    if variant.module == "vera_bank":
        return vb.GEMM_CONFIGS["16-bit" if dtype in ("fp16", "bf16") else dtype]
    if variant.configs == "dropout":
        return lk.DROPOUT_CONFIGS["16-bit" if dtype in ("fp16", "bf16") else "fp32"]
    if variant.configs == "tma":
        return lk.TMA_CONFIGS["16-bit" if dtype in ("fp16", "bf16") else dtype]
    if variant.configs == "4bit":
        flags = dict(variant.flags)
        ptr, precision = _precision(dtype)
        return l4.config_family({"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[ptr], precision,
                                flags["LAYOUT"], flags["QBLOCK"], flags["W_T"])
    if variant.kernel != "_fused_gemm_kernel":
        return lk.GRAD_CONFIGS
    return lk.GEMM_CONFIGS["16-bit" if dtype in ("fp16", "bf16") else dtype]


def largest_config(variant: Variant, dtype: str) -> int:
    """Index of the config with the largest tile (product of its block sizes), then the most warps
    and stages: the one an unaligned specialisation is compiled at (the likeliest to spill)."""
    configs = _configs(variant, dtype)

    def size(i):
        c = configs[i]
        volume = 1
        for name, value in c.kwargs.items():
            volume *= value if name.startswith("BLOCK_") else 1
        return volume, c.num_warps, c.num_stages

    return max(range(len(configs)), key=size)


@dataclass
class Result:
    kernel: str
    variant: str
    dtype: str
    target: str
    config: str
    aligned: bool  # False: no divisibility hint on any integer argument
    num_warps: int
    registers: int = -1
    stack_bytes: int = -1
    shared_bytes: int = -1
    tensor_cores: bool = False
    tma: bool = False  # bulk tensor copies (TMA loads) in the PTX: the Hopper GEMM's descriptors
    blocks_per_sm: int = -1
    warps_per_sm: int = -1
    occupancy_limit: str = ""  # the resource that limits blocks_per_sm (see occupancy())
    error: str = ""

    @property
    def ok(self) -> bool:
        """Compiled, no spills, and shared memory within the target's per-block limit."""
        cc = int(self.target.removeprefix("sm_"))
        return not self.error and self.stack_bytes == 0 and self.shared_bytes <= SHARED_LIMIT.get(cc, 0)

    @property
    def key(self) -> tuple:
        return row_key(asdict(self))


def row_key(row: dict) -> tuple:
    """What identifies a row of the report (a job): call site, alignment, dtype, target, config."""
    return (row["variant"], "aligned" if row["aligned"] else "unaligned", row["dtype"], row["target"], row["config"])


def _config_str(config: triton.Config, block_r: int | None) -> str:
    kw = dict(config.kwargs)
    if block_r is not None:
        kw.update(BLOCK_M=lk.grad_blocks(block_r)[0], BLOCK_R=block_r)
    blocks = " ".join(f"{k[len('BLOCK_'):]}{kw[k]}" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R") if k in kw)
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def _spec(variant: Variant, config: triton.Config, dtype: str, input_precision: str, aligned: bool = True):
    """(signature, constexprs, arguments with a divisibility-by-16 hint) of one specialisation."""
    fn = getattr(_KERNEL_MODULES[variant.module], variant.kernel).fn  # the JITFunction under the autotuner
    constexprs = dict(variant.flags)
    constexprs.update(config.kwargs)
    constexprs.update(INPUT_PRECISION=input_precision)
    if "DOT_IN_FP32" in fn.arg_names:
        constexprs.update(DOT_IN_FP32=False)
    if variant.block_r is not None:
        block_m, block_r = lk.grad_blocks(variant.block_r)
        constexprs.update(BLOCK_M=block_m, BLOCK_R=block_r)
    for stride in variant.unit_strides:  # Triton specialises an int equal to 1 whatever its alignment
        constexprs[stride] = 1
    signature, aligned_args = {}, []
    descriptors = dict(variant.descriptors)
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in descriptors:
            rows, cols = (constexprs[key] for key in descriptors[arg])
            signature[arg] = f"tensordesc<{_TRITON_TYPES[dtype]}[{rows}, {cols}]>"
        elif arg in variant.int_pointers:
            signature[arg] = "*i32"
            aligned_args.append(arg)
        elif arg in variant.i64_pointers:
            signature[arg] = "*i64"
            aligned_args.append(arg)
        elif arg in variant.u8_pointers:
            signature[arg] = "*u8"
            aligned_args.append(arg)
        elif arg.endswith("_ptr"):  # torch's allocations start 16-byte aligned (256 bytes on CUDA)
            signature[arg] = "*fp32" if arg in variant.fp32_pointers else f"*{_TRITON_TYPES[dtype]}"
            aligned_args.append(arg)
        elif arg in ("scale", "drop_p", "drop_scale"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            # token and feature counts, leading strides: multiples of 16 in practice (not the rank)
            if aligned and arg != "R":
                aligned_args.append(arg)
    return fn, signature, constexprs, aligned_args


def _precision(dtype: str) -> tuple[str, str]:
    """(pointer dtype, dot input precision): fp32 runs IEEE dots by default (torch's allow_tf32 is
    off); ``tf32`` is fp32 inputs with TF32 dots."""
    return ("fp32", "tf32") if dtype == "tf32" else (dtype, "ieee")


def _source(variant: Variant, config: triton.Config, dtype: str, aligned: bool = True) -> ASTSource:
    ptr_dtype, precision = _precision(dtype)
    fn, signature, constexprs, aligned_args = _spec(variant, config, ptr_dtype, precision, aligned)
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in aligned_args}
    return ASTSource(fn, signature, constexprs, attrs)


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(variant: Variant, config_index: int, dtype: str, cc: int, aligned: bool = True) -> Result:
    """Compile one (variant, config, dtype, target, alignment) and read its resource usage."""
    return compile_config(variant, _configs(variant, dtype)[config_index], dtype, cc, aligned)


def compile_config(variant: Variant, config: triton.Config, dtype: str, cc: int, aligned: bool = True) -> Result:
    """Compile a call site at any config (shipped or not) and read its resource usage."""
    result = Result(variant.kernel, variant.name, dtype, f"sm_{cc}", _config_str(config, variant.block_r),
                    aligned, config.num_warps)
    try:
        compiled = triton.compile(
            _source(variant, config, dtype, aligned),
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages, **dict(variant.options)},
        )
    except Exception as exc:  # a kernel that does not compile is a finding, not a crash of the report
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return result
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if match is None:
        result.error = f"could not read cuobjdump output: {usage.strip()[:200]}"
        return result
    result.registers, result.stack_bytes = int(match.group(1)), int(match.group(2))
    result.shared_bytes = int(getattr(compiled.metadata, "shared", 0))
    ptx = compiled.asm["ptx"]
    result.tensor_cores = ("wgmma" in ptx) if cc >= 90 else ("mma.sync" in ptx)
    result.tma = "cp.async.bulk.tensor" in ptx
    result.blocks_per_sm, result.occupancy_limit = occupancy(
        max(result.registers, 1), result.shared_bytes, config.num_warps, cc)
    result.warps_per_sm = result.blocks_per_sm * config.num_warps
    return result


def jobs(targets=TARGETS, dtypes=DTYPES) -> list[tuple]:
    """(variant, config index, dtype, target, aligned): every shipped config, then the unaligned
    specialisation at the largest one, per call site, dtype and target."""
    work = []
    for variant in variants():
        ccs = [cc for cc in targets if variant.targets is None or cc in variant.targets]
        for dtype in dtypes:
            # The LoRMA-pi launchers upcast 16-bit factors to fp32: only fp32 pointers are ever launched.
            if variant.module == "lorma_pi" and dtype not in ("fp32", "tf32"):
                continue
            if variant.dtypes is not None and dtype not in variant.dtypes:
                continue
            work += [(variant, i, dtype, cc, True) for i in range(len(_configs(variant, dtype))) for cc in ccs]
            if not variant.descriptors:  # descriptors exist only for aligned tensors (TMA's rules)
                work += [(variant, largest_config(variant, dtype), dtype, cc, False) for cc in ccs]
    return work


def job_key(job) -> tuple:
    """The key (:func:`row_key`) of the row a job produces, without compiling it."""
    variant, index, dtype, cc, aligned = job
    config = _configs(variant, dtype)[index]
    return (variant.name, "aligned" if aligned else "unaligned", dtype, f"sm_{cc}", _config_str(config, variant.block_r))


def job_spec(job) -> dict:
    """Everything that decides what a job compiles, but the kernel sources and Triton itself."""
    variant, index, dtype, cc, aligned = job
    config = _configs(variant, dtype)[index]
    ptr_dtype, precision = _precision(dtype)
    fn, signature, constexprs, aligned_args = _spec(variant, config, ptr_dtype, precision, aligned)
    return {"key": job_key(job), "kernel": variant.kernel, "signature": signature, "constexprs": constexprs,
            "divisible_by_16": aligned_args, "num_warps": config.num_warps, "num_stages": config.num_stages,
            "options": dict(variant.options), "target": cc}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def code_without_comments(source: str) -> str:
    """The source with its comments, trailing blanks and blank lines removed: what the compiler sees
    (a comment beside a config, the usual note of a spill found, needs no new report)."""
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:  # one line each; a '#' inside a string is no comment
            row, col = token.start
            lines[row - 1] = lines[row - 1][:col]
    return "\n".join(line.rstrip() for line in lines if line.strip())


def kernel_sources_hash() -> str:
    """sha256 over the kernel sources, comments left out: every ``kernels/*.py``, in name order."""
    h = hashlib.sha256()
    for path in sorted(KERNELS_DIR.glob("*.py")):
        h.update(path.name.encode() + b"\0" + code_without_comments(path.read_text()).encode() + b"\0")
    return h.hexdigest()


def fingerprint(work=None) -> dict:
    """What a report covers: the installed Triton, the kernel sources and the jobs' specifications."""
    work = jobs() if work is None else work
    specs = json.dumps([job_spec(job) for job in work], sort_keys=True, default=str).encode()
    return {"triton": triton.__version__, "kernel_sources": kernel_sources_hash(), "jobs": _sha256(specs),
            "n_jobs": len(work)}


def _run(job):
    return compile_one(*job)


def run_jobs(work: list, workers: int | None = None) -> list[Result]:
    """Compile the jobs in parallel processes; results in job order."""
    workers = min(workers or os.cpu_count() or 1, len(work) or 1)
    if workers == 1:
        return [_run(job) for job in work]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_run, work, chunksize=1 if len(work) < 200 else 4))


def run(targets=TARGETS, dtypes=DTYPES, workers: int | None = None) -> list[Result]:
    """Compile everything in parallel processes; results in job order."""
    return run_jobs(jobs(targets, dtypes), workers)


# ------------------------------------------------------------------------------ the sample


def sample_jobs(rows: list[dict]) -> list[tuple]:
    """The jobs nearest to spilling, from a report's rows (today's jobs only).

    Spills come when registers run out (255 per thread at most), so the rows with the most
    registers are the first to spill when Triton or a kernel changes: per call site and target the
    aligned row with the most registers (ties: more shared memory), and per kernel and target the
    unaligned row with the most. Rows that failed or spill in the report are left out (findings
    already, not checks). Heaviest first, so that parallel workers finish together.
    """
    by_key = {job_key(job): job for job in jobs()}
    best = {}
    for row in rows:
        job = by_key.get(row_key(row))
        if job is None or row["error"] or row["stack_bytes"] != 0:
            continue
        group = (row["variant"] if row["aligned"] else row["kernel"], row["aligned"], row["target"])
        weight = (row["registers"], row["shared_bytes"])
        if group not in best or weight > best[group][0]:
            best[group] = (weight, job)
    return [job for _, job in sorted(best.values(), key=lambda item: item[0], reverse=True)]


# A tile that must spill: the down projection's accumulator alone, 64 x 256 fp32 values over
# 2 warps, is 256 registers per thread, more than the 255 a thread can have. It compiles in about
# half a second, so it shows cheaply that spills are read and flagged.
CONTROL_CONFIG = lk.gemm_config(64, 256, 16, 2, 1)
CONTROL_VARIANT = "down projection x A^T"


def spill_control(cc: int = 80) -> Result:
    """Compile :data:`CONTROL_CONFIG` at the down projection's call site, for 16-bit inputs."""
    variant = next(v for v in variants() if v.name == CONTROL_VARIANT)
    return compile_config(variant, CONTROL_CONFIG, "fp16", cc)


# ------------------------------------------------------------------------------ output


def format_table(results: list[Result]) -> str:
    header = (f"{'kernel / call site':44} {'ints':9} {'dtype':5} {'target':6} {'config (blocks, warps, stages)':30} "
              f"{'REG':>4} {'STACK':>5} {'SMEM':>6} {'blk/SM':>6} {'warps/SM':>8} {'limit':13} TC  TMA")
    lines = [header, "-" * len(header)]
    for r in results:
        ints = "aligned" if r.aligned else "unaligned"
        if r.error:
            lines.append(f"{r.variant:44} {ints:9} {r.dtype:5} {r.target:6} {r.config:30} FAILED {r.error}")
            continue
        flag = "" if r.ok else ("  <-- spills" if r.stack_bytes else "  <-- shared memory over the limit")
        lines.append(
            f"{r.variant:44} {ints:9} {r.dtype:5} {r.target:6} {r.config:30} {r.registers:4d} {r.stack_bytes:5d} "
            f"{r.shared_bytes:6d} {r.blocks_per_sm:6d} {r.warps_per_sm:8d} {r.occupancy_limit:13} "
            f"{'yes' if r.tensor_cores else 'no':3} {'yes' if r.tma else 'no'}{flag}"
        )
    bad = [r for r in results if not r.ok]
    lines.append(f"{len(results)} compiled kernels, {len(bad)} with spills, too much shared memory or errors")
    return "\n".join(lines)


MD_BEGIN = f"<!-- generated by `{UPDATE_COMMAND}`: do not edit below this line -->"
MD_END = "<!-- end of the generated part -->"


def _summary(results: list[Result]) -> dict:
    cc = {r.target: int(r.target.removeprefix("sm_")) for r in results}
    ok = [r for r in results if not r.error]
    return {
        "compiled kernels": len(results),
        "with spills": sum(r.stack_bytes > 0 for r in ok),
        "shared memory over the limit": sum(r.shared_bytes > SHARED_LIMIT[cc[r.target]] for r in ok),
        "errors": len(results) - len(ok),
        "16-bit / tf32 without tensor cores": sum(r.dtype != "fp32" and not r.tensor_cores for r in ok),
        "max registers": max((r.registers for r in ok), default=0),
        "least warps per SM": min((r.warps_per_sm for r in ok), default=0),
    }


def format_markdown(results: list[Result], fp: dict) -> str:
    """The generated part of ``results/kernel-report.md``: the summary, then every row."""
    summary = _summary(results)
    lines = [
        MD_BEGIN, "",
        f"triton {fp['triton']}; kernel sources sha256 `{fp['kernel_sources'][:16]}`; "
        f"jobs sha256 `{fp['jobs'][:16]}` (the full fingerprint is in `{REPORT_JSON}`).", "",
        "| " + " | ".join(["triton", "ints", *summary]) + " |",
        "|" + "---|" * (len(summary) + 2),
    ]
    for ints in ("aligned", "unaligned"):
        part = _summary([r for r in results if r.aligned == (ints == "aligned")])
        lines.append("| " + " | ".join([fp["triton"], ints, *(str(v) for v in part.values())]) + " |")
    lines += [
        "",
        "Occupancy: resident blocks and warps per SM (out of 64) allowed by the registers, the shared "
        "memory and the warps of one block, and the resource that limits it (`occupancy()` in the tool "
        "states the rule). `unaligned`: no integer argument known to be a multiple of 16.", "",
        "| kernel / call site | ints | dtype | target | config | REG | STACK | SMEM | blocks/SM | warps/SM | limited by | TC | TMA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ints = "aligned" if r.aligned else "unaligned"
        if r.error:
            lines.append(f"| {r.variant} | {ints} | {r.dtype} | {r.target} | {r.config} | FAILED: {r.error} |||||||| ")
            continue
        lines.append(
            f"| {r.variant} | {ints} | {r.dtype} | {r.target} | {r.config} | {r.registers} | {r.stack_bytes} | "
            f"{r.shared_bytes} | {r.blocks_per_sm} | {r.warps_per_sm} | {r.occupancy_limit} | "
            f"{'yes' if r.tensor_cores else 'no'} | {'yes' if r.tma else 'no'} |"
        )
    lines += ["", MD_END, ""]
    return "\n".join(lines)


def report_json(results: list[Result], fp: dict) -> str:
    """The report as JSON: the fingerprint, then one row per line (diffs show the rows that changed)."""
    rows = ",\n".join("  " + json.dumps(asdict(r)) for r in results)
    return f'{{"fingerprint": {json.dumps(fp, indent=1)},\n "results": [\n{rows}\n]}}\n'


def write_report(results: list[Result], fp: dict, folder: Path = RESULTS_DIR) -> None:
    """Write ``kernel-report.json`` and replace the generated part of ``kernel-report.md`` (the
    notes above it are kept)."""
    folder = Path(folder)
    (folder / REPORT_JSON).write_text(report_json(results, fp))
    md = folder / REPORT_MD
    text = md.read_text() if md.exists() else "# Kernel report\n\n"
    head = text.split(MD_BEGIN)[0].rstrip("\n") + "\n\n"
    tail = text.split(MD_END, 1)[1].lstrip("\n") if MD_END in text else ""
    md.write_text(head + format_markdown(results, fp) + tail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma separated")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="input dtypes (tf32: fp32 inputs, TF32 dots)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--update", action="store_true",
                        help=f"compile every job and rewrite {REPORT_JSON} and {REPORT_MD} in {RESULTS_DIR}")
    parser.add_argument("--sample", metavar="REPORT",
                        help="compile only the rows of this report nearest to spilling, and a tile that must spill")
    args = parser.parse_args(argv)
    targets = tuple(int(t) for t in args.targets.split(","))
    dtypes = tuple(args.dtypes.split(","))
    control = None
    if args.update and (targets, dtypes) != (TARGETS, DTYPES):
        parser.error("--update writes the full report: no --targets or --dtypes")
    if args.update and not (RESULTS_DIR / REPORT_MD).exists():
        parser.error(f"--update needs a repository checkout: no {RESULTS_DIR / REPORT_MD}")
    if args.sample:
        with open(args.sample) as f:
            work = sample_jobs(json.load(f)["results"])
        results = run_jobs(work, args.workers)
        control = spill_control()
    else:
        work = jobs(targets, dtypes)
        results = run_jobs(work, args.workers)
    print(format_table(results))
    if control is not None:
        print(f"spill control ({CONTROL_VARIANT}, {control.config}, fp16, sm_80): stack {control.stack_bytes} bytes, "
              f"{'flagged' if not control.ok else 'NOT FLAGGED'}")
    fp = fingerprint(work)
    if args.json:
        with open(args.json, "w") as f:
            data = json.loads(report_json(results, fp))
            if control is not None:
                data["control"] = asdict(control)
            json.dump(data, f, indent=1)
    if args.update:
        write_report(results, fp)
        print(f"wrote {RESULTS_DIR / REPORT_JSON} and {RESULTS_DIR / REPORT_MD}")
    return 0 if all(r.ok for r in results) and (control is None or not control.ok) else 1


if __name__ == "__main__":
    sys.exit(main())
