"""torch.distributed set-up for runs under torchrun: process group, model wrapping, reductions."""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ..errors import MiniGPT2Error


@dataclass
class DistContext:
    """This process's place in the run; world_size 1 when not under torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    # Small agreements between hosts (a signal flag) on a CPU group: on the default NCCL group
    # reading the result back would stall the host on the GPU every step. None: the default.
    control: object = None

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
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend=backend,
        timeout=timeout,
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    return DistContext(rank, local_rank, world, control), device


def in_turns(ctx: DistContext, work, task: str = "prepare the data", every: float = 60.0):
    """work() on every rank, rank 0 first, then the first rank of each other machine, then the
    rest: one process fills a shared cache (a corpus' token shards) and the others find it
    there, instead of every rank preparing the same corpus at once. Waits last as long as the
    work takes (a gloo group with a week's timeout), not dist_timeout; one rank per machine
    says every `every` seconds what it waits for. A failed turn is raised after the last
    barrier, so the others still take theirs and report the same error."""
    if not ctx.enabled:
        return work()
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    turn = 0 if ctx.rank == 0 else 1 if ctx.local_rank == 0 else 2
    speaker = ctx.local_rank == (1 if ctx.rank == ctx.local_rank else 0)  # one per machine
    result, error = None, None
    for phase in range(3):  # every rank passes all three barriers, whatever its work did
        if phase == turn:
            try:
                result = work()
            except BaseException as e:  # re-raised once the others have had their turn
                error = e
        waiting = speaker and phase < turn
        whom = "rank 0" if phase == 0 else "the first rank of each machine"
        _barrier(group, f"rank {ctx.rank}: waiting for {whom} to {task}" if waiting else "", every)
    if error is not None:
        raise error
    return result


def _barrier(group, line: str, every: float) -> None:
    """A barrier on group; with a line, printed every `every` seconds that it waits."""
    if not line:
        dist.barrier(group=group)
        return
    pending, start, said = dist.barrier(group=group, async_op=True), time.monotonic(), 0.0
    nap = 0.001  # short at first: most waits (a cache already prepared) last milliseconds
    while not pending.is_completed():
        waited = time.monotonic() - start
        if waited - said >= every:
            print(f"{line} ({waited:.0f} s so far)", file=sys.stderr, flush=True)
            said = waited
        time.sleep(nap)
        nap = min(nap * 2, every, 0.5)
    pending.wait()


def wrap_model(model: torch.nn.Module, ctx: DistContext, device: torch.device):
    """The module to train: model itself when alone, DDP around it under torchrun (an FSDP
    model is already sharded: see sharding.py)."""
    if not ctx.enabled:
        return model

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_across_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average of value over all ranks (value itself when alone)."""
    if not ctx.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / ctx.world_size


def all_gathered(obj, ctx: DistContext) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] when alone)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def max_across_ranks(value: int, ctx: DistContext) -> int:
    """The largest of an integer over all ranks (value itself when alone), agreed on the
    CPU: it never waits for a GPU's queued work."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.control)
    return int(t.item())


def lost_contact(error: BaseException) -> bool:
    """Whether error is a collective failing because a peer died or timed out."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout"))


def shutdown(ctx: DistContext, wait_for_all: bool = True) -> None:
    """Leave the process group. After a clean run, ranks first wait for each other: a rank
    tearing its connections down while a peer still writes the last checkpoint can abort the
    peer at exit. After a failure there is nobody reliable to wait for."""
    if ctx.enabled and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()
