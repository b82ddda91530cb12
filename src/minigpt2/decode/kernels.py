"""Weights laid out for inference on the CPU: the fastest kernel stock PyTorch has for each
dtype and matrix shape, chosen by measurement where it depends on the machine.

Decoding reads every weight matrix once per token with one row (per sequence), so it runs at
the speed weights stream from memory; the kernel decides how close to that it gets.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..model.gpt import GPT
from .native import NativeLinear, use_native_linears


class PackedLinear(torch.nn.Module):
    """A linear layer whose weight oneDNN has reordered into its blocked layout, for inference
    on the CPU: a copy, frozen, not a parameter."""

    # The batch size the layout is tuned for. Measured on gpt2's float32 matrices: packed for 8
    # or 64 rows, a product with 1, 8 or 64 rows runs as fast as or faster than packed for 1.
    ROWS_HINT = 64

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int = 0) -> None:
        super().__init__()
        w = weight.detach().contiguous()
        self.in_features = w.shape[1]  # as nn.Linear names it
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, rows or self.ROWS_HINT)
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class FewRowsLinear(torch.nn.Linear):
    """A bfloat16 linear layer for CPU decoding: with one or two rows (a decode step) ATen's own
    matrix-vector kernel, with more (prefill, scoring) oneDNN's. Measured on gpt2's 48 block
    matrices: one row 5.9 ms (ATen) against 8.2 ms (oneDNN); 4 rows 14.6 against 8.4 ms."""

    ROWS = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() > self.ROWS:
            return super().forward(x)
        onednn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False  # a process-wide switch: restored right after
        try:
            return super().forward(x)
        finally:
            torch.backends.mkldnn.enabled = onednn


def pack_beside_native(model: GPT) -> int:
    """Give each float32 NativeLinear of model a copy of its weight in oneDNN's layout, which
    multiplies its products of more than native.PACKED_FROM rows (batched decode steps and
    prompts) while one-row steps keep reading the dense weight in native.c; returns the bytes
    the copies take. gpt2's 48 block matrices, each cold, at 16 rows: 24.6 ms packed against
    33.0 in native.c (BENCHMARKS.md, serving). bfloat16 and int8 layers get none: oneDNN's
    products of those round the activations to bfloat16, so a sequence in a batch would get
    other tokens than alone; a server steps their batches in native.c (float32 activations)."""
    added = 0
    for module in model.modules():
        if "packed" in module.__dict__ or not packed_copy_available(module):
            continue
        # in __dict__, not a child module: kept out of modules(), state_dict() and .to()
        module.__dict__["packed"] = PackedLinear(module.weight, module.bias)
        added += module.weight.numel() * module.weight.element_size()
    return added


def packed_copy_available(module: torch.nn.Module) -> bool:
    """Whether pack_beside_native gives module a copy: a float32 NativeLinear on a CPU where
    oneDNN runs."""
    return (
        isinstance(module, NativeLinear)
        and module.weight.device.type == "cpu"
        and module.weight.dtype is torch.float32
        and torch.backends.mkldnn.is_available()
    )


def _pass_seconds(layers: list[torch.nn.Module], rounds: int = 9) -> float:
    """Median time of one row through every layer in turn (inputs of each layer's width), as a
    decode step meets them: each weight cold, read once per step."""
    inputs = [torch.randn(1, layer.in_features).to(torch.bfloat16) for layer in layers]
    times = []
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up
            t = time.perf_counter()
            for layer, x in zip(layers, inputs, strict=True):
                layer(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def bfloat16_decode_layers(model: GPT) -> dict[tuple[int, int], str]:
    """Give each bfloat16 linear layer the faster kernel for one row, chosen per matrix shape by
    timing here: ATen's matrix-vector product (FewRowsLinear) or oneDNN's packed weights. Each
    shape is tried both ways within a whole step's 49 products in model order, so that every
    weight is cold as in decoding (timed one shape alone, a small matrix stays in cache and
    oneDNN looks faster than it is; BENCHMARKS.md). Returns the choice per (out, in) shape."""
    linears = [
        (parent, name, child)
        for parent in list(model.modules())
        for name, child in list(parent.named_children())
        if isinstance(child, torch.nn.Linear)
    ]
    step = []
    for _, _, child in linears:
        aten = FewRowsLinear(child.in_features, child.out_features, device="meta")
        aten.weight, aten.bias = child.weight, child.bias
        step.append(aten)
    choice: dict[tuple[int, int], str] = {}
    for shape in dict.fromkeys(tuple(c.weight.shape) for _, _, c in linears):
        mine = [i for i, (_, _, c) in enumerate(linears) if tuple(c.weight.shape) == shape]
        trial = list(step)
        for i in mine:
            child = linears[i][2]
            trial[i] = PackedLinear(child.weight, child.bias, rows=1)
        packed_wins = _pass_seconds(trial) < _pass_seconds(step)
        choice[shape] = "packed" if packed_wins else "aten"
        if packed_wins:
            step = trial
    for (parent, name, child), layer in zip(linears, step, strict=True):
        if isinstance(layer, PackedLinear):
            setattr(parent, name, layer)
        else:
            child.__class__ = FewRowsLinear  # same parameters, another forward
    return choice


def packed_weights_available(weight: torch.Tensor) -> bool:
    """Whether layout_for_inference packs weights like this one (float32 on a CPU with oneDNN)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype is torch.float32
        and torch.backends.mkldnn.is_available()
    )


def layout_for_inference(model: GPT, pack: bool = True, sequences: int = 0) -> GPT:
    """Store the weights the way inference reads them fastest; the model is for inference after.

    sequences: how many the model will decode at once, a row each per product; 0 if it will
    score text instead (hundreds of rows a product). On a CPU that runs the native decoder
    (decode/native), decoding keeps dense row-major weights, which it reads: one-sequence steps
    run there, and bfloat16 batches of any size (Generator's slot stream: torch's products
    would round their activations, and a row's tokens differ from its sequence's alone).
    Except float32 with more than 2 sequences, where oneDNN's packed weights multiply faster
    (gpt2's 49 matrices at 4 rows 12.9 ms against 15.3, at 8 rows 13.0 against 16.3;
    BENCHMARKS.md) and as exactly.

    Decoding reads every weight matrix once per step, with as many rows as sequences in the
    batch. float32 on a CPU: each linear layer (the tied head too, as a copy) becomes a
    PackedLinear. On gpt2's matrices with 8 rows oneDNN's packed kernel runs 3.6x faster than
    the dense matmul (8.4 against 29.9 ms for the 49 products of a step), and with one row 1.3x
    faster than column-major weights (8.2 against 10.4 ms); scoring HellaSwag-like examples,
    with hundreds of rows a product, it takes 2.5 s where dense weights take 4.7 s
    (BENCHMARKS.md). Elsewhere float32 weights are stored column-major, which torch's
    matrix-vector product streams faster than nn.Linear's layout, and other dtypes row-major,
    which their kernels read faster.
    pack=False keeps dense weights, for torch.compile (inductor cannot lower packed ones).
    """
    float32 = model.transformer.wte.weight.dtype is torch.float32
    if 0 < sequences and (sequences <= 2 or not float32) and pack:
        if use_native_linears(model):
            return model
    if pack and packed_weights_available(model.transformer.wte.weight):
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, PackedLinear(child.weight, child.bias))
        return model
    weight = model.transformer.wte.weight
    if weight.device.type == "cpu" and weight.dtype is torch.bfloat16 and pack:
        bfloat16_decode_layers(model)
        return model
    column_major = weight.dtype is torch.float32
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                w = module.weight.data
                module.weight.data = w.t().contiguous().t() if column_major else w.contiguous()
    return model
