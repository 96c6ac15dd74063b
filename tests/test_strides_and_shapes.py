"""Every public op accepts any strides and any degenerate shape (N, n, m of 0 or 1).

Strided, transposed, expanded and offset views of each argument in turn, on both backends (the
Triton kernels under the interpreter), forward and every gradient against the float64 references
of ``pefttriton.ops.naive``. Vectors read as ``ptr + offs`` ignoring their strides once gave
relative errors of order 1 here (an expanded vector was read past its end).
"""

import pytest
import torch
from helpers import rel_err

from pefttriton import lorma_pi_linear, lowrank_linear
from pefttriton.ops.naive import lorma_pi_linear_reference, lowrank_linear_reference

ENGINE_ARGS = ("x", "weight", "bias", "A", "B", "d", "b")
N, n, m, r = 9, 11, 13, 5
VIEWS = ("transposed", "strided", "expanded", "offset")


def _view(value: torch.Tensor, how: str) -> torch.Tensor:
    """A non-contiguous (or offset) view holding ``value``'s numbers: one leaf behind it, so
    gradients with respect to the view are still defined."""
    if how == "transposed":
        if value.dim() == 1:  # a column of a transposed matrix: stride 2
            leaf = torch.stack([value, torch.zeros_like(value)], dim=0).T.contiguous().T
            return leaf.detach().requires_grad_(True)[0]
        return value.T.contiguous().detach().requires_grad_(True).T
    if how == "strided":  # every other element of the last dimension
        big = torch.zeros(*value.shape[:-1], 2 * value.shape[-1], dtype=value.dtype)
        big[..., ::2] = value
        return big.requires_grad_(True)[..., ::2]
    if how == "expanded":  # stride 0: the first row (or element) repeated
        first = value[:1].detach().clone().requires_grad_(True)
        return first.expand(value.shape)
    if how == "offset":  # a slice starting inside a larger storage
        big = torch.zeros(value.shape[0] + 3, *value.shape[1:], dtype=value.dtype)
        big[3:] = value
        return big.requires_grad_(True)[3:]
    raise ValueError(how)


def _engine_inputs(gen, dtype=torch.float32):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return {
        "x": rnd(N, n), "weight": rnd(m, n) / n**0.5, "bias": rnd(m),
        "A": rnd(r, n) / n**0.5, "B": rnd(m, r), "d": rnd(r), "b": rnd(m),
    }


def _check_op(op, ref_op, names, args, kwargs, tol, gen):
    """Output and the gradient of every tensor argument against the float64 reference."""
    for t in args.values():
        if t is not None and t.is_leaf:
            t.requires_grad_(True)
    y = op(*[args[k] for k in names], **kwargs)
    ref = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in args.items()}
    y_ref = ref_op(*[ref[k] for k in names], **kwargs)
    assert rel_err(y, y_ref) < tol
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    wrt = [k for k in names if args[k] is not None]
    grads = torch.autograd.grad(y, [args[k] for k in wrt], g.to(y.dtype))
    ref_grads = torch.autograd.grad(y_ref, [ref[k] for k in wrt], g)
    for name, got, want in zip(wrt, grads, ref_grads):
        assert rel_err(got, want) < tol, f"grad {name}: {rel_err(got, want):.2e}"


@pytest.mark.parametrize("how", VIEWS)
@pytest.mark.parametrize("arg", ENGINE_ARGS)
def test_engine_any_strides(backend, gen, arg, how):
    args = _engine_inputs(gen)
    if how == "expanded" and arg == "x":
        args["x"] = args["x"][:1].expand(N, n).clone()  # the same numbers, expanded below
    args[arg] = _view(args[arg], how)
    assert not args[arg].is_contiguous() or args[arg].storage_offset() > 0
    _check_op(lowrank_linear, lowrank_linear_reference, ENGINE_ARGS, args, {"scale": 0.7}, 1e-5, gen)


@pytest.mark.parametrize("how", VIEWS)
@pytest.mark.parametrize("arg", ("x", "weight", "bias", "A", "B"))
def test_lorma_pi_any_strides(backend, gen, arg, how):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).float()

    args = {"x": rnd(N, n), "weight": rnd(m, n) / n**0.5, "bias": rnd(m), "A": rnd(r, m) / m**0.5, "B": rnd(m, r)}
    args[arg] = _view(args[arg], how)
    names = ("x", "weight", "bias", "A", "B")
    _check_op(lorma_pi_linear, lorma_pi_linear_reference, names, args, {"scale": 0.7}, 1e-5, gen)


# ---------------------------------------------------------------------------- degenerate shapes


@pytest.mark.parametrize("shape", [(0, 4, 5), (3, 0, 5), (3, 4, 0), (1, 1, 1), (0, 0, 0), (1, 0, 1)])
def test_engine_degenerate_shapes(backend, gen, shape):
    """Like F.linear: no tokens, no input features (the product is empty: y = bias) or no outputs."""
    N_, n_, m_ = shape
    args = {
        "x": torch.randn(2, N_, n_, generator=gen, dtype=torch.float64),  # 3-D: flattened inside
        "weight": torch.randn(m_, n_, generator=gen, dtype=torch.float64),
        "bias": torch.randn(m_, generator=gen, dtype=torch.float64),
        "A": torch.randn(2, n_, generator=gen, dtype=torch.float64),
        "B": torch.randn(m_, 2, generator=gen, dtype=torch.float64),
        "d": torch.randn(2, generator=gen, dtype=torch.float64),
        "b": torch.randn(m_, generator=gen, dtype=torch.float64),
    }
    y = lowrank_linear(*[args[k] for k in ENGINE_ARGS], scale=0.5)
    assert y.shape == (2, N_, m_)
    _check_op(lowrank_linear, lowrank_linear_reference, ENGINE_ARGS, args, {"scale": 0.5}, 1e-12, gen)


@pytest.mark.parametrize("shape", [(0, 4, 5), (3, 0, 5), (1, 1, 1)])
def test_lorma_pi_degenerate_shapes(backend, gen, shape):
    N_, n_, m_ = shape
    args = {
        "x": torch.randn(N_, n_, generator=gen, dtype=torch.float64),
        "weight": torch.randn(m_, n_, generator=gen, dtype=torch.float64),
        "bias": torch.randn(m_, generator=gen, dtype=torch.float64),
        "A": torch.randn(2, m_, generator=gen, dtype=torch.float64),
        "B": torch.randn(m_, 2, generator=gen, dtype=torch.float64),
    }
    _check_op(lorma_pi_linear, lorma_pi_linear_reference, ("x", "weight", "bias", "A", "B"), args, {"scale": 0.5}, 1e-12, gen)


@pytest.mark.parametrize("kind", ["vera", "lora", "deep_lora", "lorma"])
@pytest.mark.parametrize("features", [(0, 5), (5, 0), (1, 1)])
def test_modules_degenerate_features(backend, kind, features):
    """A layer over nn.Linear(0, m) or nn.Linear(n, 0) behaves like the linear layer itself."""
    from torch import nn

    import pefttriton

    in_f, out_f = features
    base = nn.Linear(in_f, out_f).double()
    cls = {
        "vera": pefttriton.FusedVeRALinear,
        "lora": pefttriton.FusedLoRALinear,
        "deep_lora": pefttriton.FusedDeepLoRALinear,
        "lorma": pefttriton.FusedLoRMALinear,
    }[kind]
    layer = cls(base, 2)
    x = torch.randn(3, 4, in_f, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 4, out_f)
    if in_f == 0 or out_f == 0:
        torch.testing.assert_close(y, base(x), rtol=0, atol=0)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 0)])
def test_outputs_are_tensors_of_their_own(backend, gen, lead):
    """Like nn.Linear, the ops return a tensor that is no view: FSDP2 refuses views from a wrapped
    module, since an in-place op on one (a residual ``h += x``) would skip its hooks."""
    args = _engine_inputs(gen)
    x = torch.randn(*lead, n, generator=gen)
    y = lowrank_linear(x, *[args[k] for k in ENGINE_ARGS[1:]], scale=0.5)
    assert y.shape == (*lead, m) and not y._is_view()
    y_pi = lorma_pi_linear(x, args["weight"], args["bias"], torch.randn(r, m, generator=gen), args["B"], scale=0.5)
    assert y_pi.shape == (*lead, m) and not y_pi._is_view()


@pytest.mark.interpreter
def test_weight_offsets_beyond_int32(tmp_path):
    """A weight whose element offsets pass 2**31 (a large lm_head, or any view with a large row
    stride) is read with 64-bit offsets, forward (``x W^T``) and through its transposed view
    (``grad_x = g W``). The weight is a (3, 16) view with a row stride of 2**30 into a 4 GiB
    allocation that is never touched but for its 3 rows; with 32-bit offsets row 2 wraps to a
    negative address (a crash, so the check runs in a subprocess)."""
    import os
    import subprocess
    import sys

    from helpers import DEVICE

    code = f"""
import torch
from pefttriton.kernels import lowrank_linear as k
big = torch.empty(2**31 + 64, dtype=torch.float16, device="{DEVICE.type}")
w = big.as_strided((3, 16), (2**30, 1))
gen = torch.Generator().manual_seed(0)
w.copy_(torch.randn(3, 16, generator=gen))
x, g = torch.randn(5, 16, generator=gen).half().to(w.device), torch.randn(5, 3, generator=gen).half().to(w.device)
y, gx = k.fused_gemm(x, w), k.fused_gemm(g, w.T)
errs = [((y.double() - x.double() @ w.double().T).abs().max() / (x.double() @ w.double().T).abs().max()).item(),
        ((gx.double() - g.double() @ w.double()).abs().max() / (g.double() @ w.double()).abs().max()).item()]
print(max(errs))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, f"exit {done.returncode}: " + done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 2e-3
