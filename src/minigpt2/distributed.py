"""torch.distributed set-up for runs under torchrun: process group, model wrapping, reductions."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import MiniGPT2Error


@dataclass
class DistContext:
    """This process's place in the run; world_size 1 when not under torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, logs and the progress bar."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when a process group is up."""
        return self.world_size > 1


def init_distributed(device: torch.device, timeout_s: float) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, ...), if any.

    NCCL on CUDA, gloo on the CPU. The timeout bounds every collective, so a rank that dies
    stops the others with an error instead of leaving them waiting forever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise MiniGPT2Error(
                f"local rank {local_rank} has no GPU: only "
                f"{torch.cuda.device_count()} here; lower --nproc_per_node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        timeout=datetime.timedelta(seconds=timeout_s),
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    return DistContext(rank, local_rank, world), device


def wrap_model(model: torch.nn.Module, ctx: DistContext, device: torch.device, fsdp: bool):
    """DDP (or FSDP when asked) around model when a process group is up."""
    if not ctx.enabled:
        if fsdp:
            raise MiniGPT2Error("fsdp=true needs several processes: launch with torchrun")
        return model
    if fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        return FSDP(
            model,
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            device_id=device if device.type == "cuda" else None,
            use_orig_params=True,
        )
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_across_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average of value over all ranks (value itself when alone)."""
    if not ctx.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / ctx.world_size


def lost_contact(error: BaseException) -> bool:
    """Whether error is a collective failing because a peer died or timed out."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout"))


def shutdown(ctx: DistContext) -> None:
    """Leave the process group."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
