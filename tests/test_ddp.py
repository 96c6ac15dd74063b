"""DistributedDataParallel on the CPU: 2 gloo processes train a tiny Llama with fused VeRA layers.

The workers are this file run as a script (``python test_ddp.py --worker ...``), started by a
module fixture, talking over 127.0.0.1 only (a free port picked by the OS, ``GLOO_SOCKET_IFNAME=lo``),
with a hard timeout. Each rank seeds its global RNG differently before :func:`pefttriton.inject`,
so identical projections on both ranks show they come from the config's seed alone. Each rank
takes half of a batch; DDP averages the gradients, which must equal the single-process gradient
of the full batch (the loss is a mean over equally many tokens per half), step after step, for
both backends. The ranks' gradients and final parameters are bitwise equal to each other.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import rel_err, tiny_llama

# gloo processes on the CPU, kernels in the interpreter: CPU-specific by nature.
pytestmark = pytest.mark.cpu_only

STEPS = 3
WORLD = 2
BACKENDS = ("torch", "triton")
TIMEOUT_S = 150


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


def _worker(rank: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import pefttriton
    from pefttriton.adapters.vera import VeRAProjections

    os.environ["RANK"] = str(rank)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    results = {}
    for backend in BACKENDS:
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
            results[backend] = {"projections_equal": all(same), "A": proj.vera_A, "history": history, "final": final}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    # The workers import helpers (tests/) and, like pytest, find the repository root on the path.
    here = Path(__file__).resolve().parent
    pythonpath = os.pathsep.join([str(here), str(here.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {
        **os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
        "PYTHONPATH": pythonpath,
    }
    port = _free_port()
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(rank), str(port), str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(WORLD)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    elapsed = time.perf_counter() - start
    results = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    return results, elapsed


def test_ddp_gradients_equal_single_process(backend, ddp_results):
    results, elapsed = ddp_results
    rank0, rank1 = results[0][backend], results[1][backend]
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
    assert elapsed < TIMEOUT_S


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        # The interpreter must be on before pefttriton is imported, as under pytest (conftest.py).
        # (The fixture sets it in the environment too; PYTHONPATH there makes helpers importable.)
        os.environ["TRITON_INTERPRET"] = "1"
        _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        raise SystemExit("usage: python test_ddp.py --worker RANK PORT OUT_DIR")
