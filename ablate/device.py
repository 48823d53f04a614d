"""Which device a run uses, its name in words, and its peak memory: one home for training and the benchmark."""

from __future__ import annotations

import os

from ablate.errors import ConfigError
from ablate.memory import peak_rss_mb, reset_peak_rss


def resolve_device(name: str):
    """``auto`` -> CUDA when visible, else CPU; ``cuda`` without a visible GPU is a ConfigError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is not valid here: no CUDA device is visible; accepted: auto, cpu")
    return torch.device(name)


#: Environment variable holding how many CPU cores one process of a multi-worker study may use
#: (``ablate.study.workers`` sets it for each worker it starts).
CPU_SHARE_ENV = "ABLATE_CPU_SHARE"


def available_cpus() -> int:
    """CPU cores this process may use: its affinity mask, capped by its study worker's share when set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this OS
        cores = os.cpu_count() or 1
    share = os.environ.get(CPU_SHARE_ENV, "")
    return min(cores, int(share)) if share.isdigit() and int(share) >= 1 else cores


def device_name(device) -> str:
    """The device in words: the GPU's name, or the CPU with its cores and torch threads."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


class PeakMemory:
    """Peak memory since the last ``reset()``: the CUDA allocator's peak, or on CPU the process's peak RSS."""

    def __init__(self, device):
        self.device = device

    def sync(self) -> None:
        """Wait for queued GPU work (a no-op on CPU), so that a timer around it is honest."""
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        if self.device.type == "cuda":
            import torch

            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def read_mb(self) -> float:
        if self.device.type == "cuda":
            import torch

            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return peak_rss_mb()
