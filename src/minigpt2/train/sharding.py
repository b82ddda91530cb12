"""FSDP: a model built on the meta device and sharded before any weight exists, so no device
and no process ever holds all of it; each rank fills its shards from GPT-2's init, a model to
fine-tune, or the rows of a checkpoint that it holds. Saving gathers full tensors on rank 0."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import MiniGPT2Error
from ..formats.checkpoint import CheckpointFile
from ..model.config import GPTConfig
from ..model.gpt import GPT, init_tensor

# rows_of(name, start, stop): rows start:stop of the full tensor of parameter name
RowSource = Callable[[str, int, int], torch.Tensor]


def sharded_model(config: GPTConfig, device: torch.device, dtype: torch.dtype) -> GPT:
    """A GPT with every parameter sharded over the ranks (one FSDP unit per block, and the
    root, which holds the tied embedding), its shards allocated on device but not filled.
    In bfloat16 the shards are gathered and computed in bfloat16, gradients reduced in float32."""
    # here for start-up time: torch's FSDP modules take about 0.7 s to import
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if dtype is torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    with torch.device("meta"):
        model = GPT(config)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.to_empty(device=device)
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise MiniGPT2Error("FSDP lost the tie between lm_head and wte")  # torch changed
    model.reset_buffers()
    return model


def shard_rows(p: torch.Tensor) -> tuple[int, int]:
    """The rows (first dimension) of the full parameter that this rank's shard of p holds:
    FSDP splits as torch.chunk does, ceil(rows / world) each, the last ranks maybe fewer."""
    rows, world = p.shape[0], p.device_mesh.size()
    start = min(p.device_mesh.get_local_rank() * -(-rows // world), rows)
    stop = start + p.to_local().shape[0]
    if stop > rows:
        raise MiniGPT2Error(f"unexpected FSDP shard of {tuple(p.shape)}")  # torch changed
    return start, stop


@torch.no_grad()
def fill_shards(model: GPT, rows_of: RowSource) -> None:
    """Copy each parameter's rows, as this rank holds them, from rows_of."""
    for name, p in model.named_parameters():
        start, stop = shard_rows(p)
        p.to_local().copy_(rows_of(name, start, stop))


@torch.no_grad()
def fill_with_init(model: GPT) -> None:
    """GPT-2's init, drawing exactly what an unsharded model draws (the same numbers as
    GPT(config) after the same seed): one full tensor at a time on the CPU, this rank's rows
    kept."""
    for name, kind, std in model.init_plan():
        p = model.get_parameter(name)
        start, stop = shard_rows(p)
        if kind == "normal":
            full = torch.empty(p.shape, dtype=p.dtype)
            init_tensor(full, kind, std)
            p.to_local().copy_(full[start:stop])
        else:
            init_tensor(p.to_local(), kind, std)


def rows_of_model(source: torch.nn.Module) -> RowSource:
    """A RowSource over a whole model in host memory (weights to fine-tune)."""
    params = dict(source.named_parameters())
    return lambda name, start, stop: params[name][start:stop]


def rows_of_checkpoint(f: CheckpointFile) -> RowSource:
    """A RowSource over a checkpoint's model tensors: only this rank's rows are read."""
    return lambda name, start, stop: f.rows(f"model.{name}", start, stop)


def sharded_state_reader(f: CheckpointFile, model: GPT):
    """read(parameter, tensor name) for checkpoint.optimizer_state: a state tensor shaped
    like its parameter is read as this rank's rows only (a DTensor like the parameter); a
    step count whole, as every rank keeps it."""
    # here for start-up time (about 0.7 s), as above
    from torch.distributed.tensor import DTensor

    def read(param: str, name: str) -> torch.Tensor:
        p = model.get_parameter(param)
        if f.shape(name) != tuple(p.shape):
            return f.tensor(name)
        local = f.rows(name, *shard_rows(p)).to(p.device)
        return DTensor.from_local(
            local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
        )

    return read


def _full_options(**kw):
    # here for start-up time (about 0.9 s), as above
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights, on rank 0's CPU (a collective: every rank calls it)."""
    # here for start-up time (about 0.9 s), as above
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def full_optimizer_state(model, optimizer) -> dict[str, dict]:
    """Unsharded optimizer state by parameter name, on rank 0 (a collective)."""
    # here for start-up time (about 0.9 s), as above
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    return osd.get("state", {})
