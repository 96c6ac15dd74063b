"""``torch.compile(fullgraph=True)`` of a transformers model holding fused layers, on the CPU.

The engine is a ``torch.library.custom_op`` (forward and backward ops, fake implementations,
registered autograd), so Dynamo traces a whole Llama with VeRA and LoRA layers without a graph
break, and AOTAutograd puts the forward op in the forward graph and the backward op in the
backward graph. ``aot_eager`` runs that traced pair on both backends (~2.5 s each, results
bitwise equal to eager); Inductor (code generation, C++ compile) runs once on the torch backend:
~17 s cold on 2 cores, ~4 s with its on-disk cache warm.
"""

import copy

import pytest
import torch
from helpers import model_output, rel_err, tiny_llama, token_ids
from torch._dynamo.backends.common import aot_autograd

import pefttriton
from pefttriton.adapters.config import LoRAConfig, VeRAConfig
from pefttriton.integration.injection import inject
from pefttriton.integration.surgery import adapter_layers


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: the adapter layers share one ``forward`` code object, and
    Dynamo's per-code-object recompile limit would otherwise count every earlier test's layers."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(gen):
    model = inject(tiny_llama(), VeRAConfig(r=5, target_modules=["q_proj", "v_proj", "down_proj"]))
    inject(model, LoRAConfig(r=3, target_modules=["up_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model


def _run(model, ids, w):
    model.zero_grad(set_to_none=True)
    y = model_output(model, ids)
    (y * w).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads


def _compare(compiled, eager, ids, w, tol):
    y_c, g_c = _run(compiled, ids, w)
    y_e, g_e = _run(eager, ids, w)
    assert rel_err(y_c, y_e) < tol
    assert sorted(g_c) == sorted(g_e) and len(g_e) == 2 * (3 * 2 + 2)  # every adapter tensor has a grad
    for name in g_e:
        assert rel_err(g_c[name], g_e[name]) < tol, name


def test_fullgraph_aot_eager_custom_ops_in_graphs(backend, gen):
    model = _model(gen)
    graphs = {"forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return gm.forward

        return compiler

    counting = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend=counting)
    ids = token_ids(gen)
    w = torch.randn(2, 9, 37, generator=gen)
    _compare(compiled, model, ids, w, tol=1e-6)  # measured: 0 (bitwise equal)
    assert len(graphs["forward"]) == 1 and len(graphs["backward"]) == 1  # fullgraph: one graph each way

    def count(gm, op):
        return sum(node.target is op for node in gm.graph.nodes)

    n_layers = len(adapter_layers(model))
    assert count(graphs["forward"][0], torch.ops.pefttriton.lowrank_linear_fwd.default) == n_layers
    assert count(graphs["backward"][0], torch.ops.pefttriton.lowrank_linear_bwd.default) == n_layers
    # a second call with new inputs of the same shapes reuses the compiled graphs
    _compare(compiled, model, token_ids(gen), w, tol=1e-6)
    assert len(graphs["forward"]) == 1


def test_fullgraph_inductor(gen):
    pefttriton.set_backend("torch")  # restored by conftest's autouse fixture
    model = _model(gen)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="inductor")
    ids = token_ids(gen)
    w = torch.randn(2, 9, 37, generator=gen)
    # Inductor generates its own kernels for the fp32 ops around ours (RMSNorm, softmax, the loss
    # reductions) and sums in another order: measured 2e-6 (outputs) and 8e-6 (worst adapter
    # gradient, relative to its largest entry). aot_eager runs the same ops eagerly: bitwise equal.
    _compare(compiled, model, ids, w, tol=1e-4)


def test_eager_reference_is_not_trivial(gen):
    """The comparison above is meaningful: a different adapter value changes outputs and grads."""
    model = _model(gen)
    other = copy.deepcopy(model)
    with torch.no_grad():
        adapter_layers(other)[0][1].lambda_d.add_(0.1)
    ids, w = token_ids(gen), torch.randn(2, 9, 37, generator=gen)
    assert rel_err(_run(other, ids, w)[0], _run(model, ids, w)[0]) > 1e-4


# (Each adapter layer alone under fullgraph=True, dynamic=True, on both backends:
# tests/test_adapter_contract.py::test_compile_fullgraph_equals_eager.)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
