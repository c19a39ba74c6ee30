"""The same training loop on many processes (accelerate launch / torchrun): shards, FSDP2, gathered state.

DDP comes from accelerate (`accelerator.prepare`). FSDP uses PyTorch's FSDP2 `fully_shard` on each transformer
block and the root: it shards frozen and trainable parameters alike, so a frozen base with LoRA needs no special
flags. Everything that reads or writes the adapter gathers full tensors first, so a saved adapter never depends on
how training was sharded.
"""
from __future__ import annotations

import torch
from torch import nn


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the largest nn.ModuleList whose children all share one class."""
    best: list[nn.Module] = []
    best_size = 0
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1:
            size = sum(p.numel() for p in m.parameters())
            if size > best_size:
                best, best_size = list(m), size
    return best


def wrap_model(model: nn.Module, accelerator, strategy: str) -> tuple[nn.Module, bool]:
    """(model ready for this launch, whether it is FSDP-sharded): FSDP2 when asked on >1 process, else DDP/plain."""
    if accelerator.num_processes > 1 and strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model, True
    return accelerator.prepare_model(model), False


def rank_share(batch: list[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous share of a global micro-batch (the caller keeps global batches divisible)."""
    per = len(batch) // world
    return batch[rank * per:(rank + 1) * per]


def all_sum(values: list[float], accelerator) -> list[float]:
    """Element-wise sum over all processes (identity on one)."""
    if accelerator.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()


def optimizer_state(model: nn.Module, optimizer, fsdp: bool) -> dict:
    """The optimizer state in full (gathered from shards under FSDP: every rank must call this)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
