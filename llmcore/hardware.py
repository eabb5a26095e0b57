"""Devices, precisions and peak throughput: what the training and evaluation code needs to know about the hardware."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peak per GPU, FLOP/s (vendor datasheets, no sparsity). Matched against the words of
# torch.cuda.get_device_name() ("NVIDIA A100-SXM4-80GB" -> NVIDIA A100 SXM4 80GB) in order; the first pattern
# whose words all occur (whole words: L4 is not L40) wins.
PEAK_BF16_FLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),
    (("GH200",), 989e12),
    (("A100",), 312e12),
    (("L40S",), 362e12),
    (("L40",), 181e12),
    (("L4",), 121e12),
    (("V100",), 125e12),  # fp16 tensor cores (V100 has no bf16)
]


class DeviceError(ValueError):
    """The configured device or precision does not exist on this machine: bad input, not worth a retry."""


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is an error; `cuda:N` is kept."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32 (no autocast).

    `auto`: bf16 on a CUDA GPU that supports it, else fp32. fp16 needs CUDA; bf16 on a GPU without it is an error.
    """
    cuda = device.type == "cuda"
    if precision == "auto":
        return torch.bfloat16 if cuda and _native_bf16() else None
    if precision == "fp32":
        return None
    if precision == "fp16":
        if not cuda:
            raise DeviceError("precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
        return torch.float16
    if precision == "bf16":
        if cuda and not _native_bf16():
            raise DeviceError(f"precision bf16 is not supported by {torch.cuda.get_device_name(device)}")
        return torch.bfloat16
    raise DeviceError(f"unknown precision {precision!r}")


def _native_bf16() -> bool:
    """bf16 in hardware (Ampere and later). torch's own check also says yes where bf16 is only emulated
    (V100, T4), which runs without tensor cores: slower than fp32 there."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.4 has no such argument and does not count emulation
        return torch.cuda.is_bf16_supported()


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of one device, for MFU; None for CPUs and GPUs not in the table."""
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def peak_flops_for_name(name: str) -> float | None:
    words = set(name.upper().replace("-", " ").split())
    for pattern, flops in PEAK_BF16_FLOPS:
        if all(p in words for p in pattern):
            return flops
    return None


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory allocated by torch on a CUDA device since the last reset, MiB; None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def enable_tf32() -> None:
    """Let fp32 matmuls and convolutions on CUDA use TF32 tensor cores. (This API keeps torch's legacy and new
    TF32 flags consistent; setting `fp32_precision` directly makes later reads of `allow_tf32` raise.)"""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


class GpuMonitor:
    """Utilisation and memory of this process's GPU from NVML (``nvidia-ml-py``), for the metrics lines: what
    MLflow's system-metrics thread would record, which cannot run on compute nodes that write no store.
    ``sample()`` gives (None, None) on CPUs, without NVML, or when NVML fails."""

    def __init__(self, device: torch.device):
        self._handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(_physical_index(index))
            self._nvml = pynvml
        except Exception:  # no nvidia-ml-py, no driver library, a MIG slice: metrics without GPU figures
            self._handle = None

    def sample(self) -> tuple[float | None, float | None]:
        if self._handle is None:
            return None, None
        try:
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
        except Exception:
            return None, None
        return float(util), float(mem)


def _physical_index(index: int) -> int:
    """NVML counts every GPU of the node; CUDA_VISIBLE_DEVICES renumbers the ones torch sees."""
    import os

    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible) and visible[index].isdigit():
        return int(visible[index])
    return index


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
