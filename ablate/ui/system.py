"""MLflow system metrics for a training run: CPU and memory (psutil), and the run's own GPU (nvidia-ml-py).

On by default (``RunConfig.system_metrics``); MLflow's own switch ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false``
turns them off too. Disk and network are left out (a run's comparison never needs them), and on a GPU only the
run's device is sampled, as ``system/gpu_0_*``, whatever its index on the machine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os

#: Seconds between samples: a demo run of a minute still gets a curve, an hour's run 720 points per metric.
SAMPLING_INTERVAL_S = 5.0
#: MLflow's environment switch for system metrics; only an explicit false is read here.
MLFLOW_SWITCH = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"


def system_metrics_enabled(configured: bool = True) -> bool:
    """Whether to sample: the config says so, MLflow's switch does not say false, and psutil is installed."""
    if not configured or os.environ.get(MLFLOW_SWITCH, "").strip().lower() in ("false", "0"):
        return False
    return importlib.util.find_spec("psutil") is not None


def start_system_metrics(run_id: str, tracking_uri: str, device=None, *, configured: bool = True,
                         interval_s: float = SAMPLING_INTERVAL_S):
    """A started MLflow SystemMetricsMonitor for ``run_id`` (stop it with ``.finish()``), or None when off.

    ``device`` is the run's torch device: a CUDA device adds its GPU's memory, utilisation and power.
    """
    if not system_metrics_enabled(configured):
        return None
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # Its INFO lines ("Started monitoring system metrics", "Skip logging GPU metrics") would interleave with
    # every run's progress.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri)
    gpu = _device_gpu_monitor(device)
    monitor.monitors = [m for m in monitor.monitors if isinstance(m, CPUMonitor)] + ([gpu] if gpu else [])
    monitor.start()
    return monitor


def _device_gpu_monitor(device):
    """MLflow's GPU monitor narrowed to ``device``'s GPU (NVML counts every GPU; CUDA_VISIBLE_DEVICES does not
    apply to it, so the GPU is found by its UUID), or None off CUDA or without nvidia-ml-py."""
    if device is None or getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        import pynvml

        monitor = GPUMonitor()
        index = device.index if getattr(device, "index", None) is not None else torch.cuda.current_device()
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    except Exception as e:  # noqa: BLE001 - no NVML, no such GPU, an old driver: the run goes on without GPU metrics
        logging.getLogger(__name__).warning("no GPU system metrics for %s: %s", device, e)
        return None
    monitor.gpu_handles, monitor.num_gpus = [handle], 1
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop a monitor from :func:`start_system_metrics` (None is fine) and log what it sampled last."""
    if monitor is not None:
        with contextlib.suppress(Exception):
            monitor.finish()
