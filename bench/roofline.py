"""Roofline model of every benchmarked op: flops and minimum bytes moved, fused vs unfused.

Each implementation is modelled as the list of kernels it runs, every kernel reading each of its
inputs once and writing each output once (the least any implementation of that kernel list can
move; caches can only reduce re-reads *between* kernels, which the model does not assume).

* fused: the two forward launches and the backward of the engine (``pefttriton.ops.lowrank_linear``)
  plus the adapter's O(r n m) preparation (Deep LoRA's ``W2 W1``, LoRMA+'s ``A W0``). Intermediates of
  the engine (``x A^T``, ``gh``) are fp32 (fp64 for fp64 inputs).
* unfused: one eager PyTorch op per term of the formula, as the plain layers and PEFT run them, with
  the adapter weights in the layer's dtype (PEFT's fp32 adapters in a 16-bit model add casts that are
  not counted, so the unfused figures are a floor for PEFT).

Shapes: x (N, n), W0 (m, n), rank r; "step" is forward + backward with ``x`` needing a gradient (a
layer inside a network) and only the adapter's weights training. Flops count multiply and add
separately (2 per multiply-accumulate); ``gemm_flops`` are the matrix products alone, the figure
``torch.utils.flop_counter`` reports.
"""

from dataclasses import asdict, dataclass

FAMILIES = ("vera", "lora", "deep_lora", "lorma")

# Spec-sheet dense 16-bit tensor-core peaks (TFLOP/s) and memory bandwidths (GB/s), used only to
# print a floor time on those GPUs; they are vendor figures, never measurements.
GPU_SPECS = {
    "H100 PCIe": (756.0, 2000.0),
    "H100": (989.0, 3350.0),
    "A100 80GB": (312.0, 2039.0),
    "A100": (312.0, 1555.0),
}


@dataclass
class Kernel:
    """One kernel (or eager op): flops, of which in matrix products, bytes read and written."""

    name: str
    flops: int
    gemm_flops: int
    read: int
    written: int


def _gemm(name: str, M: int, N: int, K: int, read: int, written: int) -> Kernel:
    return Kernel(name, 2 * M * N * K, 2 * M * N * K, read, written)


def _ew(name: str, numel: int, read: int, written: int) -> Kernel:
    return Kernel(name, numel, 0, read, written)


def _engine(N, n, m, r, s, a, *, has_d, has_b, train_d, train_b, train_A, train_B):
    """Kernels of the fused engine, forward and backward (pefttriton's design)."""
    vec = 4 * ((r if has_d else 0) + (m if has_b else 0))
    fwd = [
        _gemm("down: xa = x A^T", N, r, n, N * n * s + r * n * s, N * r * a),
        _gemm("main: y = x W^T + bias + b*(h B^T)", N, m, n + r,
              N * n * s + m * n * s + N * r * a + m * r * s + m * s + vec, N * m * s),
    ]
    grads_k3 = _gemm("lowrank grads: gh = d*((b*g) B)", N, r, m, N * m * s + N * r * a + m * r * s + vec, N * r * a)
    if train_b:  # grad_b = sum_t g * (h B^T): h B^T recomputed tile by tile while g is read once
        grads_k3 = Kernel(grads_k3.name + ", grad_b, grad_d", grads_k3.flops * 2 + N * r, grads_k3.gemm_flops * 2,
                          grads_k3.read, grads_k3.written + 4 * (m + r))
    elif train_d:
        grads_k3 = Kernel(grads_k3.name + ", grad_d", grads_k3.flops + N * r, grads_k3.gemm_flops, grads_k3.read,
                          grads_k3.written + 4 * r)
    bwd = [grads_k3, _gemm("grad_x = g W + gh A", N, n, m + r, N * m * s + m * n * s + N * r * a + r * n * s, N * n * s)]
    if train_B:
        bwd.append(_ew("h = scale*d*xa", N * r, N * r * a, N * r * a))
        bwd.append(_gemm("grad_B = g^T h", m, r, N, N * m * s + N * r * a, m * r * a))
    if train_A:
        bwd.append(_gemm("grad_A = gh^T x", r, n, N, N * r * a + N * n * s, r * n * a))
    return fwd, bwd


def _base_eager(N, n, m, s, bias=True):
    read = N * n * s + m * n * s + (m * s if bias else 0)
    return _gemm("base: x W0^T (+ bias)", N, m, n, read, N * m * s)


def _grad_x_base(N, n, m, s):
    return _gemm("grad_x0 = g W0", N, n, m, N * m * s + m * n * s, N * n * s)


def _accumulate(name, numel, s):
    return _ew(name, numel, 2 * numel * s, numel * s)


def kernels(family: str, fused: bool, N: int, n: int, m: int, r: int, elem_bytes: int) -> tuple[list[Kernel], list[Kernel]]:
    """(forward kernels, backward kernels) of one implementation; see the module docstring."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    s = elem_bytes
    a = 8 if s == 8 else 4
    if fused:
        if family == "vera":
            return _engine(N, n, m, r, s, a, has_d=True, has_b=True, train_d=True, train_b=True, train_A=False, train_B=False)
        fwd, bwd = _engine(N, n, m, r, s, a, has_d=False, has_b=False, train_d=False, train_b=False, train_A=True, train_B=True)
        if family == "deep_lora":  # A = W2 W1 each step; its gradient flows back to W2 and W1
            fwd.insert(0, _gemm("prep: A = W2 W1", r, n, r, r * r * s + r * n * s, r * n * s))
            bwd.append(_gemm("prep grad: W2 <- grad_A W1^T", r, r, n, 2 * r * n * a, r * r * a))
            bwd.append(_gemm("prep grad: W1 <- W2^T grad_A", r, n, r, r * r * a + r * n * a, r * n * a))
        elif family == "lorma":  # LoRMA+: A_eff = A W0 each step, never an (m, m) or (m, n) matrix
            fwd.insert(0, _gemm("prep: A_eff = A W0", r, n, m, r * m * s + m * n * s, r * n * s))
            bwd.append(_gemm("prep grad: A <- grad_A_eff W0^T", r, m, n, r * n * a + m * n * s, r * m * a))
        return fwd, bwd

    Nm, Nr, Nn = N * m, N * r, N * n
    if family == "vera":  # PEFT: base(x) + lambda_b * F.linear(lambda_d * F.linear(x, A), B)
        fwd = [
            _base_eager(N, n, m, s),
            _gemm("h = x A^T", N, r, n, Nn * s + r * n * s, Nr * s),
            _ew("hd = lambda_d * h", Nr, Nr * s + 4 * r, Nr * s),
            _gemm("u = hd B^T", N, m, r, Nr * s + m * r * s, Nm * s),
            _ew("ub = lambda_b * u", Nm, Nm * s + 4 * m, Nm * s),
            _accumulate("y = y0 + ub", Nm, s),
        ]
        bwd = [
            _ew("grad_u = g * lambda_b", Nm, Nm * s + 4 * m, Nm * s),
            _ew("g * u (for grad_b)", Nm, 2 * Nm * s, Nm * s),
            _ew("grad_b = sum_t", Nm, Nm * s, 4 * m),
            _gemm("grad_hd = grad_u B", N, r, m, Nm * s + m * r * s, Nr * s),
            _ew("grad_h = grad_hd * lambda_d", Nr, Nr * s + 4 * r, Nr * s),
            _ew("grad_hd * h (for grad_d)", Nr, 2 * Nr * s, Nr * s),
            _ew("grad_d = sum_t", Nr, Nr * s, 4 * r),
            _gemm("grad_x1 = grad_h A", N, n, r, Nr * s + r * n * s, Nn * s),
            _grad_x_base(N, n, m, s),
            _accumulate("grad_x = grad_x0 + grad_x1", Nn, s),
        ]
    elif family == "lora":  # base(x) + scale * F.linear(F.linear(x, A), B)
        fwd = [
            _base_eager(N, n, m, s),
            _gemm("h = x A^T", N, r, n, Nn * s + r * n * s, Nr * s),
            _gemm("u = h B^T", N, m, r, Nr * s + m * r * s, Nm * s),
            _ew("scale * u", Nm, Nm * s, Nm * s),
            _accumulate("y = y0 + scale*u", Nm, s),
        ]
        bwd = [
            _ew("grad_u = scale * g", Nm, Nm * s, Nm * s),
            _gemm("grad_h = grad_u B", N, r, m, Nm * s + m * r * s, Nr * s),
            _gemm("grad_B = grad_u^T h", m, r, N, Nm * s + Nr * s, m * r * s),
            _gemm("grad_x1 = grad_h A", N, n, r, Nr * s + r * n * s, Nn * s),
            _gemm("grad_A = grad_h^T x", r, n, N, Nr * s + Nn * s, r * n * s),
            _grad_x_base(N, n, m, s),
            _accumulate("grad_x = grad_x0 + grad_x1", Nn, s),
        ]
    elif family == "deep_lora":  # base(x) + F.linear(F.linear(F.linear(x, W1), W2), W3)
        fwd = [
            _base_eager(N, n, m, s),
            _gemm("h1 = x W1^T", N, r, n, Nn * s + r * n * s, Nr * s),
            _gemm("h2 = h1 W2^T", N, r, r, Nr * s + r * r * s, Nr * s),
            _gemm("u = h2 W3^T", N, m, r, Nr * s + m * r * s, Nm * s),
            _accumulate("y = y0 + u", Nm, s),
        ]
        bwd = [
            _gemm("grad_h2 = g W3", N, r, m, Nm * s + m * r * s, Nr * s),
            _gemm("grad_W3 = g^T h2", m, r, N, Nm * s + Nr * s, m * r * s),
            _gemm("grad_h1 = grad_h2 W2", N, r, r, Nr * s + r * r * s, Nr * s),
            _gemm("grad_W2 = grad_h2^T h1", r, r, N, 2 * Nr * s, r * r * s),
            _gemm("grad_x1 = grad_h1 W1", N, n, r, Nr * s + r * n * s, Nn * s),
            _gemm("grad_W1 = grad_h1^T x", r, n, N, Nr * s + Nn * s, r * n * s),
            _grad_x_base(N, n, m, s),
            _accumulate("grad_x = grad_x0 + grad_x1", Nn, s),
        ]
    else:  # LoRMA+: z = x W0^T; y = z + scale * (z A^T) B^T + bias
        fwd = [
            _gemm("z = x W0^T", N, m, n, Nn * s + m * n * s, Nm * s),
            _gemm("t = z A^T", N, r, m, Nm * s + r * m * s, Nr * s),
            _gemm("u = t B^T", N, m, r, Nr * s + m * r * s, Nm * s),
            _ew("scale * u", Nm, Nm * s, Nm * s),
            _accumulate("z + scale*u", Nm, s),
            _ew("+ bias", Nm, Nm * s + m * s, Nm * s),
        ]
        bwd = [
            _ew("grad_u = scale * g", Nm, Nm * s, Nm * s),
            _gemm("grad_t = grad_u B", N, r, m, Nm * s + m * r * s, Nr * s),
            _gemm("grad_B = grad_u^T t", m, r, N, Nm * s + Nr * s, m * r * s),
            _gemm("grad_z1 = grad_t A", N, m, r, Nr * s + r * m * s, Nm * s),
            _gemm("grad_A = grad_t^T z", r, m, N, Nr * s + Nm * s, r * m * s),
            _accumulate("grad_z = g + grad_z1", Nm, s),
            _gemm("grad_x = grad_z W0", N, n, m, Nm * s + m * n * s, Nn * s),
        ]
    return fwd, bwd


def saved_bytes_model(family: str, fused: bool, N: int, n: int, m: int, r: int, elem_bytes: int) -> int:
    """Per-token activation bytes autograd keeps (input ``x`` included when kept), by the model above.

    O(r n) tensors kept by the preparations are left out: they do not grow with N.
    """
    s, a = elem_bytes, (8 if elem_bytes == 8 else 4)
    if fused:  # x A^T always; x when A trains (LoRA, Deep LoRA, LoRMA)
        return N * r * a + (0 if family == "vera" else N * n * s)
    return {
        "vera": N * r * s + N * m * s,  # h (for grad_d) and u (for grad_b)
        "lora": N * n * s + N * r * s,  # x (grad_A) and h (grad_B)
        "deep_lora": N * n * s + 2 * N * r * s,  # x, h1, h2
        "lorma": N * m * s + N * r * s,  # z (grad_A) and t (grad_B)
    }[family]


def summary(family: str, fused: bool, N: int, n: int, m: int, r: int, elem_bytes: int) -> dict:
    """Totals for forward and step (forward + backward): flops, gemm_flops, bytes, launches, intensity."""
    fwd, bwd = kernels(family, fused, N, n, m, r, elem_bytes)
    out = {}
    for part, ks in (("forward", fwd), ("step", fwd + bwd)):
        flops = sum(k.flops for k in ks)
        moved = sum(k.read + k.written for k in ks)
        out[part] = {
            "flops": flops,
            "gemm_flops": sum(k.gemm_flops for k in ks),
            "bytes": moved,
            "kernels": len(ks),
            "flops_per_byte": flops / moved,
        }
    out["kernel_list"] = {"forward": [asdict(k) for k in fwd], "backward": [asdict(k) for k in bwd]}
    out["saved_bytes_model"] = saved_bytes_model(family, fused, N, n, m, r, elem_bytes)
    return out


def gpu_spec(device_name: str) -> tuple[str, float, float] | None:
    """(key, peak 16-bit TFLOP/s, GB/s) from the spec sheet for a known GPU name, else None."""
    for key, (tflops, gbps) in GPU_SPECS.items():
        if all(part in device_name for part in key.split()):
            return key, tflops, gbps
    return None


def floor_seconds(flops: int, moved: int, peak_tflops: float, peak_gbps: float) -> float:
    """The roofline floor: the larger of compute time at peak and memory time at peak bandwidth."""
    return max(flops / (peak_tflops * 1e12), moved / (peak_gbps * 1e9))
