"""Choices that must not be measured where measuring breaks the run: inside a CUDA-graph capture
and inside an activation-checkpointed forward; ``pefttriton.warmup`` makes them ahead of time.

A capture cannot run on the CPU, so it is simulated: ``torch.cuda.is_current_stream_capturing``
(what the strategy chooser asks) and ``launch.capturing`` (what the kernel launcher asks) are
patched to say "capturing", and the tests check that nothing is timed or benchmarked then.
"""

import importlib

import pytest
import torch
from helpers import DEVICE, rel_err
from torch import nn
from torch.utils.checkpoint import checkpoint

import pefttriton
from pefttriton.kernels import launch
from pefttriton.kernels import lowrank_linear as kernels
from pefttriton.ops import strategy as chooser

engine = importlib.import_module("pefttriton.ops.lowrank_linear")


def _lora(gen, n=12, m=10, r=3):
    layer = pefttriton.FusedLoRALinear(nn.Linear(n, m), r, alpha=2 * r)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
    return layer


def test_no_strategy_timing_while_capturing(gen, monkeypatch):
    """Autotune on, a shape never seen, the stream capturing: the cost model decides, nothing is
    timed or cached; the same call outside the capture times the candidates."""
    timed = []
    monkeypatch.setattr(engine, "time_path", lambda path, *a, **k: timed.append(path) or 1.0)
    pefttriton.set_strategy_autotune(True)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not chooser._can_time(cuda) and chooser._can_time(torch.device("cpu"))
    shape = (100, 12, 10, 3)
    assert chooser.choose(cuda, torch.float32, shape, "factors", ("lean", "weight"), engine.time_path) in ("lean", "weight")
    assert timed == [] and pefttriton.strategy_cache() == {}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    chooser.choose(cuda, torch.float32, shape, "factors", ("lean", "weight"), engine.time_path)
    assert sorted(timed) == ["lean", "weight"] and len(pefttriton.strategy_cache()) == 1


def test_triton_launch_inside_a_capture_skips_the_autotuner(gen, monkeypatch):
    """Inside a capture the kernels launch without the autotuner: with the config it chose for the
    same key before (or the first one the pruner keeps), and the same result."""
    x, w = torch.randn(33, 20, generator=gen, device=DEVICE), torch.randn(17, 20, generator=gen, device=DEVICE)
    want = x.double() @ w.double().T
    y = kernels.fused_gemm(x, w)
    keys = [k for k in launch._TUNED if k[0] == id(kernels._fused_gemm_kernel)]
    assert keys, "a launch outside a capture records the tuned config"
    calls = []
    monkeypatch.setattr(type(kernels._fused_gemm_kernel), "run", lambda self, *a, **k: calls.append(1))
    monkeypatch.setattr(launch, "capturing", lambda t: True)
    again = kernels.fused_gemm(x, w)
    fresh = kernels.fused_gemm(torch.randn(300, 20, generator=gen, device=DEVICE), w)  # a key never tuned
    assert calls == [] and fresh.shape == (300, 17)
    assert rel_err(again, want) < 1e-5 and torch.equal(again, y)


def test_warmup_tunes_and_leaves_no_trace(gen, monkeypatch):
    """warmup times each new shape's candidates (autotune on), forward and backward, and restores
    every gradient it touched; a later capture of the same shapes then times nothing."""
    layer = _lora(gen)
    layer.lora_A.grad = torch.ones_like(layer.lora_A)
    x = torch.randn(4, 7, 12, generator=gen, requires_grad=True)
    timed = []
    real = engine.time_path
    monkeypatch.setattr(engine, "time_path", lambda *a, **k: timed.append(a[0]) or real(*a, **k))
    pefttriton.set_strategy_autotune(True)
    pefttriton.warmup(layer, x)
    assert sorted(timed) == ["lean", "weight"] and len(pefttriton.strategy_cache()) == 1
    assert torch.equal(layer.lora_A.grad, torch.ones_like(layer.lora_A))
    assert layer.lora_B.grad is None and x.grad is None
    timed.clear()
    layer(x).sum().backward()
    assert timed == []  # the same shape: the choice warmup made
    pefttriton.warmup(nn.Sequential(layer), x.detach(), backward=False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        pefttriton.warmup(lambda t: t, x)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_measured_autotune_under_activation_checkpointing(gen, use_reentrant):
    """Autotune on and the first call of a shape inside a checkpointed forward: the timing runs
    outside the checkpoint's saved-tensor hooks, so the recompute saves what the forward saved
    (non-reentrant checkpointing compares them) and the gradients equal the plain run's."""
    layer = _lora(gen)
    x = torch.randn(5, 12, generator=gen)
    pefttriton.set_strategy_autotune(True)
    x1 = x.clone().requires_grad_(True)
    checkpoint(layer, x1, use_reentrant=use_reentrant).square().sum().backward()
    assert len(pefttriton.strategy_cache()) >= 1
    grads = (x1.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    layer.zero_grad(set_to_none=True)
    x2 = x.clone().requires_grad_(True)
    layer(x2).square().sum().backward()
    for got, want in zip(grads, (x2.grad, layer.lora_A.grad, layer.lora_B.grad)):
        assert rel_err(got, want) < 1e-6


@pytest.mark.interpreter
def test_kernel_overrides_reach_a_backward_in_another_thread(gen, monkeypatch):
    """use_lowrank_backward / use_gemm_kernel around the forward hold for its backward even when
    the backward runs in a thread that never saw them (CUDA's autograd threads)."""
    import threading

    seen = []
    real = chooser.lowrank_backward
    monkeypatch.setattr(chooser, "lowrank_backward", lambda *args: seen.append(real(*args)) or seen[-1])
    x = torch.randn(9, 12, generator=gen, device=DEVICE, requires_grad=True)
    w, A, B = (torch.randn(*s, generator=gen, device=DEVICE) for s in ((10, 12), (3, 12), (10, 3)))
    with pefttriton.use_backend("triton"), chooser.use_lowrank_backward("blas"):
        y = pefttriton.lowrank_linear(x, w, None, A, B)
    worker = threading.Thread(target=lambda: y.sum().backward())
    worker.start()
    worker.join()
    assert seen == ["blas"] and x.grad is not None
