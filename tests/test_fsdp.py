"""FSDP2 on the CPU: 2 gloo processes shard models with fused adapters (``fully_shard``).

The workers run :func:`worker`: one pair of processes per backend, shared with tests/test_ddp.py
and started in the background with the test session (tests/distributed_workers.py),
talking over 127.0.0.1 only, with a hard timeout; the test process computes the single-process
references. A failure of the interpreted Triton workers fails the Triton test alone. Each rank
takes half of every batch and FSDP2 averages the gradients (reduce-scatter), so every gradient,
gathered with ``full_tensor()``, must equal the single-process gradient of the full batch (the
losses are means over equally many tokens per half).

Configurations (kernels on the ``torch`` backend, run by the torch workers; the residual stack
also on ``triton``, in the interpreter, run by the triton workers):

* ``residual``: a stack of fused layers (VeRA, LoRA, Deep LoRA, LoRMA plus), each followed by an
  in-place residual ``h = layer(x); h += x``, ``fully_shard`` on every fused layer and the root.
  While the ops returned a view, the in-place add dropped FSDP2's pre-backward hook, so backward
  ran on parameters already resharded (freed): a RuntimeError in the torch backend, a read of
  freed memory (the segfault) in the kernels. No "returned a view tensor" warning may appear, and
  a control module that does return a view shows that the warning is caught.
* ``vera`` / ``lora`` / ``deep_lora`` / ``lorma``: a tiny Llama with that adapter on q/v/down,
  ``fully_shard`` per fused layer and on the root, two SGD steps on the sharded parameters.
* ``bf16``: a tiny Llama with all four adapters, ``MixedPrecisionPolicy(param_dtype=bfloat16,
  reduce_dtype=float32)``, against the fp32 single process at a bf16 tolerance and, tighter,
  against one process computing with bf16 parameters.
* ``checkpointing``: the same model with ``checkpoint_wrapper`` (non-reentrant) on every decoder
  layer, ``fully_shard`` per decoder layer and on the root; the recomputation is counted.

Each Llama run saves its adapter with :func:`pefttriton.integration.distributed.save_sharded_adapter` (DCP,
each rank its shards); the test loads it into unsharded models, bit-exact, and a worker loads it
back into a freshly sharded one. A last test reads ``examples/fsdp_train.py`` run with torchrun (in the
background too).
"""

import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import background
import pytest
import torch
from distributed_workers import TIMEOUT_S, free_port, worker_env
from helpers import rel_err, tiny_llama
from torch import nn

# gloo processes on the CPU, kernels in the interpreter: CPU-specific by nature.
pytestmark = pytest.mark.cpu_only

WORLD = 2
STEPS = 2
KINDS = ("vera", "lora", "deep_lora", "lorma")
VIEW_WARNING = "returned a view tensor"
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ models


def _config(kind: str, targets: list[str]):
    from pefttriton.adapters.config import DeepLoRAConfig, LoRAConfig, LoRMAConfig, VeRAConfig

    if kind == "vera":
        return VeRAConfig(r=5, target_modules=targets, projection_seed=3)
    if kind == "lora":
        return LoRAConfig(r=4, target_modules=targets, lora_alpha=8.0)
    if kind == "deep_lora":
        return DeepLoRAConfig(r=4, target_modules=targets)
    return LoRMAConfig(r=4, target_modules=targets, alpha=4.0, variant="plus")


# The mixed model: every adapter in one tiny Llama (VeRA shares one projection pair over 2 layers).
MIXED = {"vera": ["q_proj"], "lora": ["v_proj"], "deep_lora": ["down_proj"], "lorma": ["up_proj"]}


def _randomize(model: nn.Module, seed: int) -> None:
    """Non-zero adapters (at init lambda_b, lora_B, lorma_A are 0), the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def _llama(kind: str, seed: int = 5) -> nn.Module:
    """Tiny Llama with adapter ``kind`` on q/v/down (``"mixed"``: each adapter on its own target)."""
    from pefttriton.integration.injection import inject

    model = tiny_llama(seed=0)
    # Must not matter for VeRA's projections: each rank draws another global stream.
    torch.manual_seed(1000 + int(os.environ.get("RANK", "0")))
    plan = MIXED if kind == "mixed" else {kind: ["q_proj", "v_proj", "down_proj"]}
    for adapter, targets in plan.items():
        inject(model, _config(adapter, targets))
    _randomize(model, seed)
    return model


class ResidualStack(nn.Module):
    """``x -> tanh(layer(x) + x)`` four times, the residual added in place on the layer's output."""

    def __init__(self, width: int = 24, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.blocks:
            h = layer(x)
            h += x  # in place on the fused layer's output (FSDP2 hooks the output itself)
            x = torch.tanh(h)
        return x


def _residual_stack() -> nn.Module:
    from pefttriton.integration.injection import inject

    torch.manual_seed(0)
    model = ResidualStack()
    for i, kind in enumerate(KINDS):
        inject(model, _config(kind, [f"blocks.{i}"]))
    _randomize(model, 7)
    return model


def _residual_input() -> torch.Tensor:
    return torch.randn(4, 3, 24, generator=torch.Generator().manual_seed(8))


def _batch() -> torch.Tensor:
    return torch.randint(3, 37, (4, 9), generator=torch.Generator().manual_seed(6))


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor gathered from every rank (a collective), a plain one cloned."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone().float()


def _train(model: nn.Module, loss_fn, steps: int):
    """SGD steps; per step the loss and the gradients ({bare name: full tensor}); the final parameters."""
    from pefttriton.integration.distributed import bare_name

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    history = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model)
        loss.backward()
        grads = {bare_name(n): _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        history.append((loss.item(), grads))
        opt.step()
    final = {bare_name(n): _full(p) for n, p in model.named_parameters() if p.requires_grad}
    return history, final


def _peft_llama(kind: str) -> nn.Module:
    """Tiny Llama with PEFT LoRA (dropout 0.1) or VeRA on q / v / down, adapters random (seeded)."""
    from peft import LoraConfig, VeraConfig, get_peft_model

    config = (LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
              if kind == "lora" else VeraConfig(r=6, target_modules=["q_proj", "v_proj", "down_proj"], projection_prng_key=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(seed=0), config)
    _randomize(model, 11)
    return model.train()


# ------------------------------------------------------------------------------ workers


def _shard_fused_layers(model: nn.Module, mesh, **kw) -> None:
    from torch.distributed.fsdp import fully_shard

    from pefttriton.integration.surgery import adapter_layers

    for _, layer in adapter_layers(model):
        fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)


def _caught(record: list) -> list[str]:
    return [str(w.message) for w in record if VIEW_WARNING in str(w.message)]


def _projections_report(model: nn.Module) -> dict:
    """What each rank says of the shared VeRA projections: one object, plain, full, this rank's values."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from pefttriton.adapters.vera import FusedVeRALinear

    shared = {id(m.projections): m.projections for m in model.modules() if isinstance(m, FusedVeRALinear)}
    (proj,) = shared.values()
    report = {"plain": not isinstance(proj.vera_A, DTensor) and not isinstance(proj.vera_B, DTensor)}
    for name in ("vera_A", "vera_B"):
        t = getattr(proj, name)
        gathered = [torch.empty_like(t) for _ in range(WORLD)]
        dist.all_gather(gathered, t.contiguous())
        report[name] = t.clone()
        report[f"{name}_ranks_equal"] = all(torch.equal(g, t) for g in gathered)
    return report


def worker(backend: str, rank: int, out_dir) -> dict:
    """One rank's FSDP2 runs under ``backend`` (in a worker process of distributed_workers.py): the
    residual stack on either backend; the Llama runs, the view control, bf16 and checkpointing
    with the torch workers."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import pefttriton
    from pefttriton.integration.distributed import adapter_state_dict, load_sharded_adapter, save_sharded_adapter

    mesh = init_device_mesh("cpu", (WORLD,))
    out = Path(out_dir)
    half = slice(rank * 2, rank * 2 + 2)
    results, times = {}, {}

    def timed(name, fn):
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            result = fn()
        result["view_warnings"] = _caught(record)
        results[name] = result
        times[name] = time.perf_counter() - start

    def residual(backend):
        with pefttriton.use_backend(backend):
            model = _residual_stack()
            _shard_fused_layers(model, mesh)
            x = _residual_input()[half]
            history, final = _train(model, lambda m: m(x).pow(2).mean(), 1)
            return {"history": history, "path": pefttriton.last_path()}

    def view_control():
        # A wrapped module that returns a view: FSDP2 must warn (the check above can fail).
        model = nn.Sequential(nn.Linear(6, 6))
        inner = nn.Linear(6, 6)
        model.append(inner)
        inner.forward = lambda x, lin=inner: nn.functional.linear(x, lin.weight, lin.bias).view(-1, 6)
        fully_shard(inner, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model(torch.ones(2, 6)).sum().backward()
        return {}

    def llama(kind):
        with pefttriton.use_backend("torch"):
            model = _llama(kind)
            _shard_fused_layers(model, mesh)
            history, final = _train(model, lambda m: _lm_loss(m, _batch()[half]), STEPS)
            result = {"history": history, "final": final}
            if kind == "vera":
                result["projections"] = _projections_report(model)
            ckpt = out / f"ckpt_{kind}"
            save_sharded_adapter(model, ckpt)
            result["saved"] = {k: _full(v) for k, v in adapter_state_dict(model).items()}
            # Back into a freshly sharded model holding other values: every shard bit-exact.
            fresh = _llama(kind, seed=99)
            _shard_fused_layers(fresh, mesh)
            load_sharded_adapter(fresh, ckpt)
            result["reloaded"] = {k: _full(v) for k, v in adapter_state_dict(fresh).items()}
        return result

    def bf16():
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        with pefttriton.use_backend("torch"):
            model = _llama("mixed")
            _shard_fused_layers(model, mesh, mp_policy=policy)
            dtypes = []
            layer = model.model.layers[0].self_attn.q_proj
            hook = layer.register_forward_hook(lambda m, args, y: dtypes.append((args[0].dtype, y.dtype)))
            history, final = _train(model, lambda m: _lm_loss(m, _batch()[half]), 1)
            hook.remove()
            grad_dtypes = {str(p.grad.dtype) for p in model.parameters() if p.grad is not None}
            result = {"history": history, "dtypes": dtypes, "grad_dtypes": grad_dtypes}
            result["projections"] = _projections_report(model)
        return result

    def checkpointing():
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        with pefttriton.use_backend("torch"):
            model = _llama("mixed")
            wrapper = lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT)  # noqa: E731
            apply_activation_checkpointing(
                model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, LlamaDecoderLayer)
            )
            for block in model.model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            calls = []
            # A pre-hook: a recomputation stops inside the last module that saves for backward
            # (torch.utils.checkpoint's early stop), before that module's forward hooks.
            layer = model.model.layers[1]._checkpoint_wrapped_module.self_attn.q_proj
            layer.register_forward_pre_hook(lambda *args: calls.append(torch.is_grad_enabled()))
            history, final = _train(model, lambda m: _lm_loss(m, _batch()[half]), STEPS)
            names = [n for n, _ in model.named_parameters()]
            save_sharded_adapter(model, out / "ckpt_checkpointing")
            saved = {k: _full(v) for k, v in adapter_state_dict(model).items()}
        return {"history": history, "final": final, "forward_calls": len(calls), "wrapped_names": names,
                "saved": saved}

    def peft_model(kind, policy=None, accelerated=True):
        # PEFT's own layers accelerated in place, each decoder layer and the root fully_shard-ed
        with pefttriton.use_backend("torch"):
            model = _peft_llama(kind)
            if accelerated:
                pefttriton.accelerate(model)
            for block in model.base_model.model.model.layers:
                fully_shard(block, mesh=mesh, **({"mp_policy": policy} if policy else {}))
            fully_shard(model, mesh=mesh, **({"mp_policy": policy} if policy else {}))
            try:
                history, final = _train(model, lambda m: _lm_loss(m, _batch()[half]), 1)
            except Exception as exc:  # noqa: BLE001 - plain PEFT VeRA under bf16 mixed precision: recorded
                return {"error": f"{type(exc).__name__}: {exc}"[:300]}
            last = pefttriton.acceleration_report(model).last
        return {"history": history, "last": sorted(set(last.values()))}

    timed("residual", lambda: residual(backend))
    if backend == "torch":
        bf16_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        timed("peft_lora", lambda: peft_model("lora"))
        timed("peft_vera_bf16", lambda: peft_model("vera", bf16_policy))
        timed("peft_vera_bf16_plain", lambda: peft_model("vera", bf16_policy, accelerated=False))
        timed("view_control", view_control)
        for kind in KINDS:
            timed(kind, lambda kind=kind: llama(kind))
        timed("bf16", bf16)
        timed("checkpointing", checkpointing)
    results["times"] = times
    return results


def _bf16_params(model: nn.Module) -> nn.Module:
    """What FSDP2's bf16 ``param_dtype`` computes with: every parameter in bf16, buffers (VeRA's
    projections, the rotary frequencies) as they are."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


@pytest.fixture(scope="module")
def fsdp_run(distributed_runs):
    """The torch workers' results (every configuration), their folder (the checkpoints) and the
    single-process references on the full batch, computed in this process."""
    import pefttriton

    refs = {}
    with pefttriton.use_backend("torch"):
        for kind in KINDS:
            refs[kind] = _train(_llama(kind), lambda m: _lm_loss(m, _batch()), STEPS)
        refs["mixed"] = _train(_llama("mixed"), lambda m: _lm_loss(m, _batch()), STEPS)
        refs["mixed_bf16"] = _train(_bf16_params(_llama("mixed")), lambda m: _lm_loss(m, _batch()), 1)
    ranks = distributed_runs.results("torch", "test_fsdp")
    return {"ranks": ranks, "refs": refs, "out": distributed_runs.folder_of("torch")}


# ------------------------------------------------------------------------------ tests


def _assert_same_run(ranks, ref_history, name, tol):
    """Both ranks' gathered gradients (per step) equal each other bitwise and the reference
    history's (``[(loss, grads)]``) within ``tol``; the ranks' losses average to the reference
    loss. Returns the largest relative error."""
    worst = 0.0
    h0, h1 = ranks[0][name]["history"], ranks[1][name]["history"]
    assert len(h0) == len(h1) == len(ref_history) > 0
    for step, ((loss, grads), (l0, g0), (l1, g1)) in enumerate(zip(ref_history, h0, h1)):
        assert sorted(g0) == sorted(grads), f"{name} step {step}: other parameters have gradients"
        for key, g in grads.items():
            assert torch.equal(g0[key], g1[key]), f"{name} step {step} {key}: ranks gathered different gradients"
            err = rel_err(g0[key], g)
            worst = max(worst, err)
            assert err < tol, f"{name} step {step} {key}: relative error {err:.2e} >= {tol:.0e}"
        assert abs((l0 + l1) / 2 - loss) <= tol * abs(loss), f"{name} step {step}: losses {l0}, {l1} vs {loss}"
    return worst


def test_in_place_residual_under_fsdp2(backend, distributed_runs):
    ranks = distributed_runs.results(backend, "test_fsdp")  # this backend's workers
    x = _residual_input()
    ref = _train(_residual_stack(), lambda m: m(x).pow(2).mean(), 1)[0]  # under the backend fixture
    grads = ref[0][1]
    assert len(grads) == 9 and all(g.abs().max() > 0 for g in grads.values())  # 2 + 2 + 3 + 2 adapter tensors
    err = _assert_same_run(ranks, ref, "residual", 2e-6)
    print(f"residual ({backend}): max relative gradient error {err:.1e}")
    for rank in ranks:
        assert rank["residual"]["view_warnings"] == []
        assert rank["residual"]["path"] in (("fused", "split") if backend == "triton" else ("lean", "weight"))


def test_view_warning_is_caught(fsdp_run):
    """The control: a view returned by a wrapped module is reported, so the checks for no such
    warning are live (the workers of both backends record warnings with the same code)."""
    import inspect

    from torch.distributed.fsdp._fully_shard import _fsdp_state

    if VIEW_WARNING not in inspect.getsource(_fsdp_state):
        pytest.skip(f"this torch's FSDP2 ({torch.__version__}) has no view warning to catch")
    assert all(len(rank["view_control"]["view_warnings"]) > 0 for rank in fsdp_run["ranks"])


def test_fused_outputs_are_not_views(backend):
    """The cause of the warning and of the crash: each adapter layer's output owns its storage."""
    model = _residual_stack()
    x = _residual_input()
    for layer in model.blocks:
        y = layer(x)
        assert y._base is None and y.shape == x.shape, type(layer).__name__


@pytest.mark.parametrize("kind", KINDS)
def test_llama_gradients_equal_single_process(fsdp_run, kind):
    ranks, refs = fsdp_run["ranks"], fsdp_run["refs"]
    history, final = refs[kind]
    n_layers = 2 * 3
    per_layer = {"vera": 2, "lora": 2, "deep_lora": 3, "lorma": 2}[kind]
    assert len(history[0][1]) == n_layers * per_layer
    err = _assert_same_run(ranks, history, kind, 1e-5)
    print(f"{kind}: max relative gradient error {err:.1e}")
    for name, p in final.items():  # SGD on the sharded parameters
        assert torch.equal(ranks[0][kind]["final"][name], ranks[1][kind]["final"][name])
        assert rel_err(ranks[0][kind]["final"][name], p) < 1e-5, name
    for rank in ranks:
        assert rank[kind]["view_warnings"] == []


def test_vera_projections_replicated_not_sharded(fsdp_run):
    from pefttriton.adapters.vera import VeRAProjections

    # tiny Llama: VeRA on q/v/down spans in-features up to 45 (down) and out-features up to 30
    # (q, down); the mixed model's VeRA is on q alone (30 x 30)
    for run, (max_in, max_out) in (("vera", (45, 30)), ("bf16", (30, 30))):
        seed_draw = VeRAProjections(5, max_in, max_out, seed=3)
        for rank in fsdp_run["ranks"]:
            report = rank[run]["projections"]
            assert report["plain"], "FSDP2 turned the shared projections into DTensors"
            assert report["vera_A_ranks_equal"] and report["vera_B_ranks_equal"]
            assert report["vera_A"].dtype == torch.float32  # buffers: the bf16 policy leaves them alone
            assert torch.equal(report["vera_A"], seed_draw.vera_A)  # also checks the full shape
            assert torch.equal(report["vera_B"], seed_draw.vera_B)


def test_bf16_mixed_precision(fsdp_run):
    ranks, refs = fsdp_run["ranks"], fsdp_run["refs"]
    for rank in ranks:
        run = rank["bf16"]
        assert run["dtypes"] and set(run["dtypes"]) == {(torch.bfloat16, torch.bfloat16)}  # computed in bf16
        assert run["grad_dtypes"] == {"torch.float32"}  # reduced into the fp32 shards
        assert run["view_warnings"] == []
    # bf16 has 8 significant bits: the errors of a few roundings through two layers add up
    err32 = _assert_same_run(ranks, refs["mixed"][0][:1], "bf16", 1e-1)
    err16 = _assert_same_run(ranks, refs["mixed_bf16"][0], "bf16", 2e-2)
    print(f"bf16: max relative gradient error {err32:.1e} against fp32, {err16:.1e} against one bf16 process")
    assert err32 > 1e-4, "the bf16 run matches fp32 too closely to have computed in bf16"


def test_activation_checkpointing(fsdp_run):
    ranks, refs = fsdp_run["ranks"], fsdp_run["refs"]
    for rank in ranks:
        run = rank["checkpointing"]
        # forward once per step plus once more in backward: the recomputation ran
        assert run["forward_calls"] == 2 * STEPS
        assert any("_checkpoint_wrapped_module" in n for n in run["wrapped_names"])
        assert run["view_warnings"] == []
    err = _assert_same_run(ranks, refs["mixed"][0], "checkpointing", 1e-5)
    print(f"checkpointing: max relative gradient error {err:.1e}")
    for name, p in refs["mixed"][1].items():
        assert rel_err(ranks[0]["checkpointing"]["final"][name], p) < 1e-5, name


# ------------------------------------------------------------------------------ checkpoints


def _unsharded(kind: str) -> nn.Module:
    return _llama(kind, seed=123)  # adapters hold other values until loaded


@pytest.mark.parametrize("kind", [*KINDS, "checkpointing"])
def test_dcp_checkpoint_loads_bit_exact(fsdp_run, kind):
    from torch.distributed.checkpoint import FileSystemReader

    from pefttriton.integration.distributed import METADATA_FILE, adapter_state_dict, load_sharded_adapter

    ckpt = fsdp_run["out"] / f"ckpt_{kind}"
    saved = fsdp_run["ranks"][0][kind]["saved"]
    assert fsdp_run["ranks"][1][kind]["saved"].keys() == saved.keys()
    # only adapter tensors, under the bare model's names: no base weight, no wrapper prefix
    model = _unsharded("mixed" if kind == "checkpointing" else kind)
    from pefttriton.integration.surgery import adapter_layers

    expected = {f"{name}.{p}" for name, layer in adapter_layers(model) for p in layer.adapter_layer_names}
    meta = FileSystemReader(str(ckpt)).read_metadata()
    assert set(meta.state_dict_metadata) == expected == set(saved)
    assert (ckpt / METADATA_FILE).is_file()
    # written sharded: every tensor in two dim-0 chunks that tile it, one from each rank's file
    files = {index.fqn: set() for index in meta.storage_data}
    for index, info in meta.storage_data.items():
        files[index.fqn].add(info.relative_path)
    for key, item in meta.state_dict_metadata.items():
        rows = sorted((c.offsets[0], c.sizes[0]) for c in item.chunks)
        assert len(rows) == WORLD and rows[0][0] == 0 and rows[0][1] == rows[1][0], key
        assert rows[1][0] + rows[1][1] == item.size[0] and len(files[key]) == WORLD, key
    before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    load_sharded_adapter(model, ckpt)
    loaded = adapter_state_dict(model)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    for n, p in model.named_parameters():  # base weights untouched
        if n in before:
            assert torch.equal(p, before[n]), n
    if kind in KINDS:  # the worker's reload into a freshly sharded model
        for key, value in saved.items():
            assert torch.equal(fsdp_run["ranks"][0][kind]["reloaded"][key], value), key


def test_consolidated_checkpoint_matches_save_adapter(fsdp_run, tmp_path):
    """The single file made from the sharded checkpoint is what save_adapter writes from the
    unsharded model, and load_adapter injects it into a plain model."""
    from pefttriton.integration.distributed import consolidate_sharded_adapter, load_sharded_adapter
    from pefttriton.integration.save import load_adapter, read_adapter, save_adapter

    ckpt = fsdp_run["out"] / "ckpt_checkpointing"
    consolidate_sharded_adapter(ckpt, tmp_path / "consolidated.safetensors")
    model = load_sharded_adapter(_unsharded("mixed"), ckpt)
    save_adapter(model, tmp_path / "direct.safetensors")
    t1, m1 = read_adapter(tmp_path / "consolidated.safetensors")
    t2, m2 = read_adapter(tmp_path / "direct.safetensors")
    assert m1 == m2
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    plain = load_adapter(tiny_llama(seed=0), tmp_path / "consolidated.safetensors")
    ids = _batch()
    torch.testing.assert_close(_lm_loss(plain, ids), _lm_loss(model, ids), rtol=0, atol=0)


def test_distributed_helpers_reject_bad_input(fsdp_run, tmp_path):
    from pefttriton.integration.distributed import (
        adapter_state_dict,
        consolidate_sharded_adapter,
        load_sharded_adapter,
        save_sharded_adapter,
    )
    from pefttriton.integration.injection import inject

    with pytest.raises(TypeError, match="nn.Module"):
        adapter_state_dict("model")
    with pytest.raises(ValueError, match="no fused adapter layer"):
        adapter_state_dict(tiny_llama(seed=0))
    with pytest.raises(TypeError, match="path"):
        save_sharded_adapter(_unsharded("vera"), 3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        save_sharded_adapter(_unsharded("vera"), tmp_path / "file")
    with pytest.raises(ValueError, match="not a pefttriton sharded adapter"):
        load_sharded_adapter(_unsharded("vera"), tmp_path)
    with pytest.raises(ValueError, match="not a pefttriton sharded adapter"):
        consolidate_sharded_adapter(tmp_path, tmp_path / "out.safetensors")
    ckpt = fsdp_run["out"] / "ckpt_vera"
    cases = {
        "plain model": (tiny_llama(seed=0), "not a fused adapter layer"),
        "other adapter": (_unsharded("lora"), "is a lora adapter"),
    }
    other_seed = tiny_llama(seed=0)
    from pefttriton.adapters.config import VeRAConfig

    inject(other_seed, VeRAConfig(r=5, target_modules=["q_proj", "v_proj", "down_proj"], projection_seed=4))
    cases["other seed"] = (other_seed, "seed")
    other_rank = tiny_llama(seed=0)
    inject(other_rank, VeRAConfig(r=6, target_modules=["q_proj", "v_proj", "down_proj"], projection_seed=3))
    cases["other rank"] = (other_rank, "rank 6")
    for what, (model, message) in cases.items():
        before = {n: p.clone() for n, p in model.named_parameters()}
        with pytest.raises(ValueError, match=message):
            load_sharded_adapter(model, ckpt)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), f"{what}: model changed"


def _damaged_checkpoint(tmp_path, how):
    """A single-process sharded checkpoint of the mixed Llama, its one ``.distcp`` file damaged."""
    from pefttriton.integration.distributed import save_sharded_adapter

    ckpt = tmp_path / "ckpt"
    save_sharded_adapter(_llama("mixed", seed=7), ckpt)
    (data,) = ckpt.glob("*.distcp")
    raw = data.read_bytes()
    if how == "truncated":  # cut in the last tensor: the first ones read fine (and were copied)
        data.write_bytes(raw[: len(raw) - 64])
    else:  # every byte after the first quarter zeroed
        data.write_bytes(raw[: len(raw) // 4] + bytes(len(raw) - len(raw) // 4))
    return ckpt


@pytest.mark.parametrize("how", ["truncated", "zeroed"])
def test_damaged_checkpoint_changes_nothing(tmp_path, how):
    """A damaged .distcp file fails inside DCP's read, after some tensors were read: the model is
    left exactly as it was (the tensors are read into a staging copy first), and the error is a
    ValueError naming the folder (DCP's own CheckpointException is a BaseException, which
    ``except Exception`` misses). Consolidating it fails alike and writes no file. One process:
    DCP saves and loads without a process group."""
    from pefttriton.integration.distributed import consolidate_sharded_adapter, load_sharded_adapter

    ckpt = _damaged_checkpoint(tmp_path, how)
    model = _unsharded("mixed")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(Exception) as caught:  # noqa: PT011 - an Exception at all is the first point
        load_sharded_adapter(model, ckpt)
    assert isinstance(caught.value, ValueError) and f"{ckpt}: cannot read" in str(caught.value), repr(caught.value)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed by a failed load"
    with pytest.raises(ValueError, match=f"{re.escape(str(ckpt))}: cannot read"):
        consolidate_sharded_adapter(ckpt, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_setting_in_metadata_changes_nothing(tmp_path):
    """A setting the layer refuses (LoRA dropout 1.5 in pefttriton_adapter.json) is found before any
    tensor is read into the model, not by the setter after the tensors were copied."""
    import json

    from pefttriton.integration.distributed import METADATA_FILE, load_sharded_adapter, save_sharded_adapter

    ckpt = tmp_path / "ckpt"
    save_sharded_adapter(_llama("mixed", seed=7), ckpt)
    meta = json.loads((ckpt / METADATA_FILE).read_text())
    layer = "model.layers.1.self_attn.v_proj"
    assert meta["layers"][layer]["adapter_type"] == "lora"
    meta["layers"][layer]["kwargs"]["dropout"] = 1.5
    (ckpt / METADATA_FILE).write_text(json.dumps(meta))
    model = _unsharded("mixed")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = {n: (m.alpha, m.dropout) for n, m in model.named_modules() if hasattr(m, "lora_A")}
    with pytest.raises(ValueError, match=rf"{re.escape(str(ckpt))}: layer '{layer}'.*dropout"):
        load_sharded_adapter(model, ckpt)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed by a failed load"
    assert settings == {n: (m.alpha, m.dropout) for n, m in model.named_modules() if hasattr(m, "lora_A")}


def test_worker_wall_time(backend, distributed_runs):
    times = distributed_runs.results(backend, "test_fsdp")[0]["times"]
    print(f"{backend} worker seconds per configuration:", {k: round(v, 1) for k, v in times.items()})
    # (the workers run in the background; what a test waits is what the suite pays)
    print(f"{backend}: a test waited {distributed_runs.waited[(backend, 'test_fsdp')]:.1f} s for the FSDP results")
    assert sum(times.values()) < TIMEOUT_S


# ------------------------------------------------------------------------------ the example


def _example_command(folder, items):
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(ROOT / "examples" / "fsdp_train.py"), "--steps", "4", "--out", str(folder / "adapter"),
    ]


# torchrun runs the example in the background from the start of the session (tests/background.py).
EXAMPLE = background.Job("fsdp_example_run", _example_command, TIMEOUT_S, env=worker_env, cwd="folder")


@pytest.fixture
def fsdp_example_run():
    return EXAMPLE.wait(), EXAMPLE.folder / "adapter"


def test_example_fsdp_train_runs_under_torchrun(fsdp_example_run):
    proc, out = fsdp_example_run
    if proc.returncode is None:
        pytest.fail(f"examples/fsdp_train.py did not finish within {TIMEOUT_S} s")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    losses = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 4 and losses[-1] < losses[0], log[-3000:]
    final = [line for line in proc.stdout.splitlines() if line.startswith("final loss ")]
    assert len(final) == 1, log[-3000:]
    # The saved adapter, loaded into an unsharded model built like the example's, gives its final loss.
    import importlib.util

    from pefttriton.integration.distributed import load_sharded_adapter

    spec = importlib.util.spec_from_file_location("fsdp_train", ROOT / "examples" / "fsdp_train.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.build_model("vera")
    load_sharded_adapter(model, out)
    with torch.no_grad():
        loss = example.loss_fn(model, example.batch(0, 1)).item()
    assert abs(loss - float(final[0].split()[-1])) < 1e-4 * abs(loss)



def test_accelerated_peft_model_under_fully_shard(fsdp_run):
    """accelerate on a PEFT model, then fully_shard (FSDP2): every adapted layer runs fused in every
    call, and the gradients equal one process's plain PEFT on the full batch; PEFT VeRA trains
    under a bf16 MixedPrecisionPolicy accelerated, where plain PEFT VeRA fails (its fp32 projections
    meet bf16 activations in F.linear)."""
    import pefttriton

    ranks = fsdp_run["ranks"]
    lora = [r["peft_lora"] for r in ranks]
    assert all(r["last"] and all(what.startswith("fused (") for what in r["last"]) for r in lora), lora[0].get("last")
    reference = _peft_llama("lora")
    with pefttriton.use_backend("torch"):
        history, _ = _train(reference, lambda m: _lm_loss(m, _batch()), 1)
    (_, grads), = history
    for rank in lora:
        (_, rank_grads), = rank["history"]
        assert sorted(rank_grads) == sorted(grads)
        for name, g in grads.items():
            assert rel_err(rank_grads[name], g) < 1e-5, name
    vera = [r["peft_vera_bf16"] for r in ranks]
    assert all("error" not in r and r["last"] and all(w.startswith("fused (") for w in r["last"]) for r in vera), vera[0]
    assert all(math.isfinite(r["history"][0][0]) for r in vera)
    assert all("error" in r["peft_vera_bf16_plain"] for r in ranks)  # the premise: plain PEFT VeRA fails
