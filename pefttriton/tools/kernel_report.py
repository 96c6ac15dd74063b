"""Compile every Triton kernel of pefttriton for real GPUs, on any machine, and report its resources.

    python -m pefttriton.tools.kernel_report [--targets 80,90] [--dtypes fp16,bf16,fp32] [--json FILE]

Triton compiles ahead of time for a named target without a GPU: ``triton.compile`` turns each
kernel, at each shipped autotune config and each way the ops launch it, into a cubin for sm_80
(A100) and sm_90 (H100); ``cuobjdump`` (shipped in the triton wheel) then reads registers and
stack bytes per thread. STACK > 0 means register spills. Tensor-core use is read off the PTX
(``mma.sync`` on sm_80, ``wgmma`` on sm_90). The interpreter accepts code the compiler rejects, so
this report is the check that the kernels are real GPU code.

Launches are specialised as on a typical GPU run: pointers and the leading dimensions 16-byte
aligned, unit strides as constants, the rank not assumed to be a multiple of 16.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pefttriton.kernels import lorma_pi as lp
from pefttriton.kernels import lowrank_linear as lk
from pefttriton.kernels import vera_bank as vb

_KERNEL_MODULES = {"lowrank_linear": lk, "lorma_pi": lp, "vera_bank": vb}

_TRITON_TYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
# Largest shared memory one block may use: 163 KiB on A100 (sm_80), 227 KiB on H100 (sm_90).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


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


def _gemm_variants():
    def flags(main, bias, lowrank, d, bvec, accumulate=False, c_is_y=True):
        return (("HAS_MAIN", main), ("HAS_BIAS", bias), ("HAS_LOWRANK", lowrank), ("HAS_D", d),
                ("HAS_BVEC", bvec), ("ACCUMULATE", accumulate), ("C_IS_Y", c_is_y))

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


def variants() -> list[Variant]:
    """Every (kernel, call site) pair the ops launch."""
    return _gemm_variants() + _grad_variants() + _lorma_pi_variants() + _vera_bank_variants()


def _configs(variant: Variant, dtype: str) -> list[triton.Config]:
    """The configs the autotuner may pick for this call site and dtype (``tf32``: fp32 inputs, TF32 dots)."""
    if variant.module == "lorma_pi":
        return lp.CONFIGS[variant.kernel]  # one list: fp32 dots for every input dtype
    if variant.module == "vera_bank":
        return vb.GEMM_CONFIGS["16-bit" if dtype in ("fp16", "bf16") else dtype]
    if variant.kernel != "_fused_gemm_kernel":
        return lk.GRAD_CONFIGS
    return lk.GEMM_CONFIGS["16-bit" if dtype in ("fp16", "bf16") else dtype]


@dataclass
class Result:
    kernel: str
    variant: str
    dtype: str
    target: str
    config: str
    registers: int
    stack_bytes: int
    shared_bytes: int
    tensor_cores: bool
    error: str = ""

    @property
    def ok(self) -> bool:
        """Compiled, no spills, and shared memory within the target's per-block limit."""
        cc = int(self.target.removeprefix("sm_"))
        return not self.error and self.stack_bytes == 0 and self.shared_bytes <= SHARED_LIMIT.get(cc, 0)


def _config_str(config: triton.Config, block_r: int | None) -> str:
    kw = dict(config.kwargs)
    if block_r is not None:
        kw.update(BLOCK_M=lk.grad_blocks(block_r)[0], BLOCK_R=block_r)
    blocks = " ".join(f"{k[len('BLOCK_'):]}{kw[k]}" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R") if k in kw)
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def _source(variant: Variant, config: triton.Config, dtype: str, input_precision: str) -> ASTSource:
    fn = getattr(_KERNEL_MODULES[variant.module], variant.kernel).fn  # the JITFunction under the autotuner
    constexprs = dict(variant.flags)
    constexprs.update(config.kwargs)
    constexprs.update(INPUT_PRECISION=input_precision)
    if "DOT_IN_FP32" in fn.arg_names:
        constexprs.update(DOT_IN_FP32=False)
    if variant.block_r is not None:
        block_m, block_r = lk.grad_blocks(variant.block_r)
        constexprs.update(BLOCK_M=block_m, BLOCK_R=block_r)
    for stride in variant.unit_strides:
        constexprs[stride] = 1
    signature, aligned = {}, []
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in variant.int_pointers:
            signature[arg] = "*i32"
            aligned.append(i)
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in variant.fp32_pointers else f"*{_TRITON_TYPES[dtype]}"
            aligned.append(i)
        elif arg == "scale":
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg != "R":  # token and feature counts, leading strides: multiples of 16 in practice
                aligned.append(i)
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return ASTSource(fn, signature, constexprs, attrs)


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(variant: Variant, config_index: int, dtype: str, cc: int) -> Result:
    """Compile one (variant, config, dtype, target) and read its resource usage."""
    config = _configs(variant, dtype)[config_index]
    result = Result(variant.kernel, variant.name, dtype, f"sm_{cc}", _config_str(config, variant.block_r), -1, -1, -1, False)
    # fp32 runs with IEEE dots by default (torch's allow_tf32 is off); TF32 is compiled too, see main().
    precision = "tf32" if dtype == "tf32" else "ieee"
    ptr_dtype = "fp32" if dtype == "tf32" else dtype
    try:
        compiled = triton.compile(
            _source(variant, config, ptr_dtype, precision),
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
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
    return result


def jobs(targets=(80, 90), dtypes=("fp16", "bf16", "fp32", "tf32")) -> list[tuple]:
    return [
        (variant, index, dtype, cc)
        for variant in variants()
        for dtype in dtypes
        # The LoRMA-pi launchers upcast 16-bit factors to fp32: only fp32 pointers are ever launched.
        if variant.module != "lorma_pi" or dtype in ("fp32", "tf32")
        for index in range(len(_configs(variant, dtype)))
        for cc in targets
    ]


def _run(job):
    return compile_one(*job)


def run(targets=(80, 90), dtypes=("fp16", "bf16", "fp32", "tf32"), workers: int | None = None) -> list[Result]:
    """Compile everything in parallel processes; results in job order."""
    work = jobs(targets, dtypes)
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_run(job) for job in work]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_run, work, chunksize=4))


def format_table(results: list[Result]) -> str:
    header = f"{'kernel / call site':44} {'dtype':5} {'target':6} {'config (blocks, warps, stages)':34} {'REG':>4} {'STACK':>5} {'SMEM':>6} TC"
    lines = [header, "-" * len(header)]
    for r in results:
        if r.error:
            lines.append(f"{r.variant:44} {r.dtype:5} {r.target:6} {r.config:34} FAILED {r.error}")
            continue
        flag = "" if r.ok else ("  <-- spills" if r.stack_bytes else "  <-- shared memory over the limit")
        lines.append(
            f"{r.variant:44} {r.dtype:5} {r.target:6} {r.config:34} {r.registers:4d} {r.stack_bytes:5d} "
            f"{r.shared_bytes:6d} {'yes' if r.tensor_cores else 'no'}{flag}"
        )
    bad = [r for r in results if not r.ok]
    lines.append(f"{len(results)} compiled kernels, {len(bad)} with spills, too much shared memory or errors")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma separated")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32,tf32", help="input dtypes (tf32: fp32 inputs, TF32 dots)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    targets = tuple(int(t) for t in args.targets.split(","))
    dtypes = tuple(args.dtypes.split(","))
    results = run(targets, dtypes, args.workers)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
