"""General fine-tuning with RoseLoRA (or dense LoRA): the same loop as edits, over a data file, DDP-ready.

Under `torchrun --nproc_per_node=N` each rank trains on its share of every global batch; DDP averages
the gradients, so parameters, importance scores and masks are identical on every rank by construction,
and the early-stopping loss is all-reduced so every rank stops at the same step.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..method.config import RoseLoraConfig
from .data import Encoded, collate
from .train import EditResult, train_lora


def setup_distributed() -> tuple[int, int]:
    """(rank, world size); joins the gloo process group when started by torchrun with WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def batch_indices(n: int, step: int, batch_size: int, rank: int, world: int, seed: int) -> list[int]:
    """Example indices for this rank at `step` (1-based): a seeded shuffle per epoch, the global batch split by rank."""
    per_step = batch_size * world
    first = (step - 1) * per_step + rank * batch_size
    out = []
    for pos in range(first, first + batch_size):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[i]))
    return out


def train_finetune(model: torch.nn.Module, examples: list[Encoded], config: RoseLoraConfig, *, method: str = "roselora",
                   batch_size: int = 8, pad_id: int = 0, progress: bool = False, keep_peft: bool = False) -> EditResult:
    """Fine-tune an adapter for config.steps optimizer steps (t_init/t_final below 1 are fractions of them)."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = next(model.parameters()).device

    def batches(t: int):
        idx = batch_indices(len(examples), t, batch_size, rank, world, config.seed)
        return [{k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}]

    wrap = reduce_loss = None
    if distributed:
        wrap = DistributedDataParallel

        def reduce_loss(loss: float) -> float:
            value = torch.tensor([loss], dtype=torch.float64)
            dist.all_reduce(value)
            return float(value) / world

    torch.manual_seed(config.seed)
    return train_lora(model, batches, config, method=method, total_steps=config.steps, keep_peft=keep_peft,
                      wrap=wrap, reduce_loss=reduce_loss, progress=progress and rank == 0)
