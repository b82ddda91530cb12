"""The device switch: which device and dtype to run on, and how fast that device can go."""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch

from .errors import MiniGPT2Error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense (non-sparse) peak TFLOP/s from NVIDIA's data sheets, by the exact name
# torch.cuda.get_device_name() reports. fp16/bf16 with float32 accumulation (what torch uses);
# None where the part has no such unit (V100 and T4: no bfloat16, no TF32).
_T = {"fp32": 67, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}  # H100 SXM5, H200, GH200
_A100 = {"fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312}
_NVL = {"fp32": 60, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}  # H100 NVL, H200 NVL
_V100 = {"fp32": 15.7, "tf32": None, "bf16": None, "fp16": 125}  # SXM2
_V100_PCIE = {"fp32": 14, "tf32": None, "bf16": None, "fp16": 112}
GPU_PEAK_TFLOPS: dict[str, dict[str, float | None]] = {
    "NVIDIA H100 80GB HBM3": _T,
    "NVIDIA H100 PCIe": {"fp32": 51.2, "tf32": 378, "bf16": 756, "fp16": 756},
    "NVIDIA H100 NVL": _NVL,
    "NVIDIA H200": _T,
    "NVIDIA H200 NVL": _NVL,
    "NVIDIA GH200 480GB": _T,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125, "fp16": 125},
    "NVIDIA L40S": {"fp32": 91.6, "tf32": 183, "bf16": 362, "fp16": 362},
    "NVIDIA L40": {"fp32": 90.5, "tf32": 90.5, "bf16": 181, "fp16": 181},
    "NVIDIA L4": {"fp32": 30.3, "tf32": 60, "bf16": 121, "fp16": 121},
    "NVIDIA GeForce RTX 4090": {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2},
    "NVIDIA GeForce RTX 3090": {"fp32": 35.6, "tf32": 35.6, "bf16": 71, "fp16": 71},
    "Tesla V100-SXM2-16GB": _V100,
    "Tesla V100-SXM2-32GB": _V100,
    "Tesla V100-PCIE-16GB": _V100_PCIE,
    "Tesla V100-PCIE-32GB": _V100_PCIE,
    "Tesla T4": {"fp32": 8.1, "tf32": None, "bf16": None, "fp16": 65},
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


def idle_cores(window: float = 0.1) -> float | None:
    """How many cores other processes left idle over the next `window` seconds, from the
    kernel's CPU time counters (Linux); None where there are none to read."""

    def times() -> tuple[int, int, int]:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        cores = sum(1 for ln in lines if ln.startswith("cpu") and ln[3:4].isdigit())
        fields = [int(x) for x in lines[0].split()[1:]]  # "cpu": user nice system idle iowait
        return cores, fields[3] + fields[4], sum(fields[:8])

    try:
        cores, idle0, total0 = times()
        time.sleep(window)
        _, idle1, total1 = times()
    except (OSError, ValueError, IndexError):
        return None
    return cores * (idle1 - idle0) / max(total1 - total0, 1)


def set_threads(count: int = 0) -> int:
    """Set torch's CPU threads to count; 0 means one per core that is idle now (at least one,
    at most torch's default, which OMP_NUM_THREADS sets). Returns the number set.

    Why not simply one per core: torch's threads wait for each other at every operation, so
    when another busy process takes a core, the thread sharing it holds all the others up. On
    2 cores beside one busy process, 2 threads trained the quickstart 1.9x slower than 1 thread,
    while on a quiet machine they are 1.6x faster (BENCHMARKS.md, "CPU threads")."""
    if count < 0:
        raise MiniGPT2Error(f"threads={count} must be 0 (one per idle core) or more")
    if count == 0:
        count = torch.get_num_threads()
        idle = None if "OMP_NUM_THREADS" in os.environ else idle_cores()
        if idle is not None:
            count = max(1, min(count, round(idle)))
    torch.set_num_threads(count)
    return count


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Turn 'float32', 'bfloat16' or 'float16' into a dtype the device can compute in."""
    if name not in DTYPES:
        raise MiniGPT2Error(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype is torch.bfloat16 and device.type == "cuda":
        # is_bf16_supported() alone counts emulation (V100, T4), many times slower than fp16
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            raise MiniGPT2Error(
                f"{torch.cuda.get_device_name(device)} has no native bfloat16; "
                "use --dtype=float16 (or float32)"
            )
    return dtype


def use_tf32(device: torch.device, on: bool) -> None:
    """TensorFloat-32 for float32 matrix products on CUDA (10-bit mantissa inputs, float32
    sums): several times faster on A100 and later, as nanoGPT and torchtitan train."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"


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


def peak_flops(device: torch.device, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """Peak FLOP/s of one device for MFU in dtype (float32 as TF32 where tf32 is on and the
    GPU has it), or None for a GPU not in the table."""
    if device.type == "cpu":
        return measured_cpu_peak_flops(torch.bfloat16 if dtype is torch.bfloat16 else torch.float32)
    if device.type != "cuda":
        return None
    peaks = GPU_PEAK_TFLOPS.get(torch.cuda.get_device_name(device))
    if peaks is None:
        return None
    kind = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    if kind == "fp32" and tf32 and peaks["tf32"]:
        kind = "tf32"
    return peaks[kind] * 1e12 if peaks[kind] else None
