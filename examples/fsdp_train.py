"""Fine-tune a small Llama with a fused adapter, sharded with FSDP2 (``fully_shard``), and save it with DCP.

    torchrun --nproc_per_node 2 examples/fsdp_train.py                      # CPUs (gloo) or GPUs (nccl)
    torchrun --nproc_per_node 2 examples/fsdp_train.py --adapter lora --bf16 --checkpointing

The model is a Llama built from a ``transformers.LlamaConfig`` with random weights (no download),
the data a fixed random batch of token ids; each rank trains on its share of the batch. Steps:

1. ``pefttriton.inject`` the adapter into the plain model (every rank draws VeRA's projections
   from the config's seed, so they agree without a broadcast);
2. optionally activation checkpointing on each decoder layer (``checkpoint_wrapper``);
3. ``fully_shard`` on each decoder layer, then on the root (optionally with a bf16
   ``MixedPrecisionPolicy``: compute in bf16, gradients reduced in fp32 into the fp32 shards);
4. train with AdamW over the adapter parameters (each rank updates its shards);
5. ``pefttriton.integration.distributed.save_sharded_adapter``: each rank writes its shards of the adapter, not
   the frozen model. ``load_sharded_adapter`` loads it into a sharded or unsharded model built the
   same way, and ``consolidate_sharded_adapter`` makes one safetensors file for ``load_adapter``.

Rank 0 prints ``step <i> loss <mean loss over ranks>`` and, after training, ``final loss <loss>``
(the loss of the whole batch under the trained adapter).
"""

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

import pefttriton
from pefttriton.integration.distributed import save_sharded_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 64
BATCH, LENGTH = 8, 16


def build_model(adapter: str, seed: int = 0) -> nn.Module:
    """The same random Llama on every rank (``seed``), with ``adapter`` on every linear layer of the blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False,
    )
    model = LlamaForCausalLM(config)
    configs = {
        # lambda_b starts at 0, so lambda_d sets the first steps' pace: PEFT's 0.1 is slow on this toy task
        "vera": pefttriton.VeRAConfig(r=16, target_modules=TARGETS, projection_seed=0, d_initial=1.0),
        "lora": pefttriton.LoRAConfig(r=8, target_modules=TARGETS, lora_alpha=16.0),
        "deep_lora": pefttriton.DeepLoRAConfig(r=8, target_modules=TARGETS),
        "lorma": pefttriton.LoRMAConfig(r=8, target_modules=TARGETS, variant="plus"),
    }
    pefttriton.inject(model, configs[adapter])
    return model


def batch(rank: int, world: int) -> torch.Tensor:
    """This rank's rows of the fixed (BATCH, LENGTH) batch of token ids (every row for ``world == 1``)."""
    ids = torch.randint(1, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    return ids[rank::world]


def loss_fn(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Causal-LM loss: the mean over this batch's tokens."""
    return model(input_ids=ids, labels=ids).loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", choices=["vera", "lora", "deep_lora", "lorma"], default="vera")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--bf16", action="store_true", help="compute in bf16, reduce gradients in fp32")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    parser.add_argument("--out", default="fsdp_adapter", help="directory of the sharded adapter checkpoint")
    args = parser.parse_args()

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mesh = init_device_mesh(device.type, (world,))

    model = build_model(args.adapter)
    if args.checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        apply_activation_checkpointing(
            model, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda m: isinstance(m, LlamaDecoderLayer),
        )
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
    kw = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    for block in model.model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)  # moves the parameters and buffers (VeRA's projections) to the device

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ids = batch(rank, world).to(device)
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, ids)
        loss.backward()
        optimizer.step()
        mean = loss.detach().float()
        dist.all_reduce(mean)  # a sum (gloo has no average); equal shares, so sum / world is the batch mean
        if rank == 0:
            print(f"step {step} loss {mean.item() / world:.6f}", flush=True)

    with torch.no_grad():
        final = loss_fn(model, ids).float()
    dist.all_reduce(final)
    stats = save_sharded_adapter(model, args.out)
    if rank == 0:
        print(f"final loss {final.item() / world:.6f}", flush=True)
        print(f"saved {stats['tensors']} adapter tensors ({stats['bytes']:,} bytes) to {args.out}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
