"""Convergence: a tiny Llama trained with fused VeRA follows PEFT VeRA's loss curve step by step.

Same base weights, same projections (one seed), same lambda init, same data, Adam(lr=2e-2) on
the causal-LM loss, VeRA r=16 on all seven linear layers of each block. The two runs differ only
in the order of fp32 summations (the engine adds the low-rank path inside one GEMM and computes
its own backward), so each step's loss may differ by a few fp32 ulps that Adam carries on;
measured: at most 1.4e-7 relative over 50 steps (torch backend). The bound, 1e-5 relative per
step, is 70x that and still far below what a semantic difference produces: the same fused run
started from ``d_initial = 0.105`` instead of 0.1 differs by 8e-4 within the 50 steps (checked
below to exceed 10x the bound).

The Triton backend runs in the CPU interpreter (about 1.2 s per training step for this model), so
it is held to the same bound for the first 3 steps only: the first loss checks the forward, the
second the first update (Adam's first step follows the gradients' signs), the third the second
update (the ratio of two steps' gradients); a fourth step exercises nothing new. Its per-kernel
agreement with the reference is covered in tests/test_lowrank_linear.py.
"""

import warnings

import pytest
import torch
from peft import VeraConfig, get_peft_model
from helpers import tiny_llama

from pefttriton.adapters.config import VeRAConfig
from pefttriton.integration.injection import inject

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, SEED, LR = 16, 1, 2e-2
TOL = 1e-5
STEPS = {"torch": 50, "triton": 3}


def _losses(model, steps):
    ids = torch.randint(3, 37, (8, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.fixture(scope="module")
def peft_curve():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), VeraConfig(r=R, target_modules=TARGETS, projection_prng_key=SEED))
    return _losses(model, STEPS["torch"])


def _fused_curve(steps, d_initial=0.1):
    model = inject(tiny_llama(), VeRAConfig(r=R, target_modules=TARGETS, projection_seed=SEED, d_initial=d_initial))
    return _losses(model, steps)


def test_same_loss_curve_as_peft(backend, peft_curve):
    steps = STEPS[backend]
    fused = _fused_curve(steps)
    reference = peft_curve[:steps]
    rel = (fused - reference).abs() / reference.abs()
    assert rel.max().item() < TOL, f"max relative loss difference {rel.max().item():.2e} at step {rel.argmax().item()}"
    if backend == "torch":
        # the curve goes somewhere: training lowers the loss clearly (3.62 -> 3.34 measured)
        assert reference[-1] < reference[0] - 0.2


def test_tolerance_detects_a_small_semantic_difference(peft_curve):
    fused = _fused_curve(STEPS["torch"], d_initial=0.105)
    rel = (fused - peft_curve).abs() / peft_curve.abs()
    assert rel.max().item() > 10 * TOL
