"""DistributedDataParallel on the CPU: 2 gloo processes train a tiny Llama with fused VeRA layers.

The workers run :func:`worker` (one pair of processes per backend, shared with tests/test_fsdp.py:
see tests/distributed_workers.py), talking over 127.0.0.1 only. Each rank seeds its global RNG
differently before :func:`pefttriton.inject`, so identical projections on both ranks show they come
from the config's seed alone. Each rank takes half of a batch; DDP averages the gradients, which
must equal the single-process gradient of the full batch (the loss is a mean over equally many
tokens per half), step after step, for both backends. The ranks' gradients and final parameters
are bitwise equal to each other.
"""

import os

import pytest
import torch
from helpers import rel_err, tiny_llama

# gloo processes on the CPU, kernels in the interpreter: CPU-specific by nature.
pytestmark = pytest.mark.cpu_only

STEPS = 3
WORLD = 2


def _build():
    """The model every process builds: tiny Llama, VeRA on q/v/down, non-zero lambdas."""
    from pefttriton.adapters.config import VeRAConfig
    from pefttriton.integration.injection import inject

    model = tiny_llama(seed=0)
    torch.manual_seed(1000 + int(os.environ.get("RANK", "0")))  # must not matter for the projections
    inject(model, VeRAConfig(r=5, target_modules=["q_proj", "v_proj", "down_proj"], projection_seed=3))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # lambda_b = 0 at init would make every lambda_d gradient 0
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model


def _batch():
    return torch.randint(3, 37, (4, 9), generator=torch.Generator().manual_seed(6))


def _train(model, ids, step_hook=None):
    """SGD steps of the causal-LM loss on ``ids``; per step the loss and the adapter gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    history = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        history.append((loss.item(), grads))
        opt.step()
    final = {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return history, final


def worker(backend: str, rank: int, out_dir) -> dict:
    """One rank's DDP run under ``backend`` (in a worker process of distributed_workers.py)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import pefttriton
    from pefttriton.adapters.vera import VeRAProjections

    with pefttriton.use_backend(backend):
        model = _build()
        proj = next(m for m in model.modules() if isinstance(m, VeRAProjections))
        same = []
        for t in (proj.vera_A, proj.vera_B):
            gathered = [torch.empty_like(t) for _ in range(WORLD)]
            dist.all_gather(gathered, t)
            same.append(all(torch.equal(g, gathered[0]) for g in gathered))
        ddp = DDP(model)
        ids = _batch()
        half = ids.shape[0] // WORLD
        history, final = _train(ddp, ids[rank * half : (rank + 1) * half])
    return {"projections_equal": all(same), "A": proj.vera_A, "history": history, "final": final}


def test_ddp_gradients_equal_single_process(backend, distributed_runs):
    rank0, rank1 = distributed_runs.results(backend, "test_ddp")
    # the shared projections: identical on every rank, and the seed's (not the global RNG's) draw
    assert rank0["projections_equal"] and rank1["projections_equal"]
    model = _build()  # RANK unset here: a third global seed
    from pefttriton.adapters.vera import VeRAProjections

    proj = next(m for m in model.modules() if isinstance(m, VeRAProjections))
    assert torch.equal(proj.vera_A, rank0["A"])
    history, final = _train(model, _batch())
    assert len(rank0["history"]) == STEPS
    for step, ((_, grads), (_, g0), (_, g1)) in enumerate(zip(history, rank0["history"], rank1["history"])):
        assert sorted(grads) == sorted(g0) and len(grads) == 12
        for name, g in grads.items():
            assert torch.equal(g0[name], g1[name]), f"step {step} {name}: ranks differ after all-reduce"
            # all-reduce sums two half-batch means in another order than one full-batch mean
            err = rel_err(g0[name], g)
            assert err < 1e-5, f"step {step} {name}: relative error {err:.2e}"
    # the ranks' losses average to the full-batch loss
    for (loss, _), (l0, _), (l1, _) in zip(history, rank0["history"], rank1["history"]):
        assert abs((l0 + l1) / 2 - loss) < 1e-5 * abs(loss)
    for name, p in final.items():
        assert torch.equal(rank0["final"][name], rank1["final"][name])
        assert rel_err(rank0["final"][name], p) < 1e-5

