"""The device switch: which device and dtype to run on, and how fast that device can go."""

from __future__ import annotations

import contextlib
import functools
import time

import torch

from .errors import MiniGPT2Error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense (non-sparse) tensor-core peaks in FLOP/s from the vendors' data sheets, keyed by a
# substring of torch.cuda.get_device_name(). bf16 and fp16 share a peak on these parts.
GPU_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "A10G": {"bf16": 125e12, "fp32": 31.2e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp32": 30.3e12},
    "RTX 4090": {"bf16": 165e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "fp32": 35.6e12},
    "V100": {"bf16": 125e12, "fp32": 15.7e12},
    "T4": {"bf16": 65e12, "fp32": 8.1e12},
}


def resolve_device(name: str = "auto") -> torch.device:
    """Turn 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' into a torch.device that exists here."""
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MiniGPT2Error(
            f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MiniGPT2Error(
                f"device {name!r} asked for, but CUDA is not available here; "
                "use --device=cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MiniGPT2Error(
                f"device {name!r} asked for, but only "
                f"{torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise MiniGPT2Error(
            f"device {name!r} asked for, but MPS is not available here; use --device=cpu or auto"
        )
    elif device.type not in ("cpu", "cuda", "mps"):
        raise MiniGPT2Error(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Turn 'float32', 'bfloat16' or 'float16' into a dtype the device can compute in."""
    if name not in DTYPES:
        raise MiniGPT2Error(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MiniGPT2Error("this GPU has no bfloat16 support; use --dtype=float16 or float32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the forward pass; a no-op in float32."""
    if dtype is torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@functools.cache
def measured_cpu_peak_flops(dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """FLOP/s of a square matrix product on this CPU, measured once (the CPU's practical peak)."""
    gen = torch.Generator().manual_seed(0)  # private: a run's random stream stays untouched
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    a @ b  # warm-up: thread pool start and kernel selection
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of the device in use for MFU, or None for a GPU not in the table."""
    if device.type == "cpu":
        return measured_cpu_peak_flops(torch.bfloat16 if dtype is torch.bfloat16 else torch.float32)
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        kind = "fp32" if dtype is torch.float32 else "bf16"
        for key, peaks in GPU_PEAK_FLOPS.items():
            if key in gpu:
                return peaks[kind]
    return None
