"""What a benchmark result ran on: CPU model and threads, torch, and GPUs via nvidia-ml-py.

``machine_info()`` never fails on a machine without a GPU or without ``pynvml``: the ``gpus``
entry is then an empty list and ``gpu_note`` says why.
"""

from __future__ import annotations

import os
import platform

import torch

from moe_parallel.cpu_memory import reusing_freed_memory


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> tuple[list[dict], str]:
    """Every NVIDIA GPU: name, memory, clocks and power limit (NVML), and why none if empty."""
    try:
        import pynvml
    except ImportError:
        return [], "pynvml (nvidia-ml-py) not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # NVMLError_LibraryNotFound without a GPU driver
        return [], f"NVML unavailable: {exc}"
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append({
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_gib": pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30,
                "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                "mem_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
                "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
            })
        return gpus, "" if gpus else "no NVIDIA GPU found"
    finally:
        pynvml.nvmlShutdown()


def machine_info() -> dict:
    """The machine of a result, as a JSON-ready dict."""
    gpus, note = _gpus()
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpus": gpus,
        "heap_reuse": reusing_freed_memory(),
    }
    if note:
        info["gpu_note"] = note
    return info
