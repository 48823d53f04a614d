"""Process memory figures shared by training and the benchmark (no torch, no MLflow: both import it cheaply)."""

from __future__ import annotations

import resource


def reset_peak_rss() -> None:
    """Reset the peak resident set (VmHWM) to the current one on Linux; elsewhere the peak covers the process."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident set since the last reset, in MiB (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
