"""Per-channel mean/std of a training split, computed once and cached beside the data as JSON.

Cache: ``<data_root>/scconv-ablate-stats/<dataset>.json``, written atomically
(``ablate.fileio.atomic_write``) so that parallel workers never read half a file. The
training-set size is stored with the numbers; a cache whose size differs (the tree changed) is
recomputed. A read-only data root is not an error: the stats are then recomputed on each build.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ablate.fileio import atomic_write

#: Images sampled from large training sets (Food-101, image folders) to estimate the stats.
MAX_SAMPLE = 2000
#: Seed of that sample, fixed so that every machine computes the same numbers.
SAMPLE_SEED = 0
STATS_DIR = "scconv-ablate-stats"


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and std of pixel values in [0, 1], and how they were obtained."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train_images: int  #: size of the training split the stats describe (cache key)
    images_used: int  #: images that entered the computation
    method: str  #: one line on how they were computed


def channel_moments(chunks: Iterable[np.ndarray]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and (population) std per channel over chunks shaped (C, pixels), values in [0, 1].

    Sums are accumulated in float64 chunk by chunk, so the whole split never sits in memory as floats.
    """
    total = sq = None
    count = 0
    for chunk in chunks:
        x = np.asarray(chunk, dtype=np.float64)
        s, q = x.sum(axis=1), np.square(x).sum(axis=1)
        total, sq = (s, q) if total is None else (total + s, sq + q)
        count += x.shape[1]
    if count == 0:
        raise ValueError("no pixels to compute channel statistics from")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def array_stats(images_hwc: np.ndarray, chunk: int = 5000) -> ChannelStats:
    """Stats of a whole uint8 (N, H, W, C) array (CIFAR's raw training array)."""
    n, c = images_hwc.shape[0], images_hwc.shape[-1]
    chunks = (images_hwc[i : i + chunk].reshape(-1, c).T / 255.0 for i in range(0, n, chunk))
    mean, std = channel_moments(chunks)
    return ChannelStats(mean, std, n, n, "all training images, all pixels")


def sampled_stats(num_images: int, load: Callable[[int], object]) -> ChannelStats:
    """Stats of a fixed-seed sample of at most MAX_SAMPLE images, ``load(i)`` giving an RGB PIL image.

    Pixels are taken at each image's own resolution (larger photos weigh more), so the numbers do not
    depend on ``image_size`` and one cache serves every run.
    """
    rng = np.random.default_rng(SAMPLE_SEED)
    picked = np.sort(rng.choice(num_images, size=min(MAX_SAMPLE, num_images), replace=False))
    chunks = (np.asarray(load(int(i)).convert("RGB")).reshape(-1, 3).T / 255.0 for i in picked)
    mean, std = channel_moments(chunks)
    method = f"native-resolution pixels of {len(picked)} training images sampled with seed {SAMPLE_SEED}"
    return ChannelStats(mean, std, num_images, len(picked), method)


def cache_path(root: Path, dataset: str) -> Path:
    """Where the stats of ``dataset`` under ``root`` are cached."""
    return root / STATS_DIR / f"{dataset}.json"


def cached_stats(path: Path, num_train_images: int, compute: Callable[[], ChannelStats]) -> ChannelStats:
    """The cached stats at ``path`` when they describe ``num_train_images`` images; else compute and cache."""
    found = _read(path)
    if found is not None and found.num_train_images == num_train_images:
        return found
    stats = compute()
    try:
        atomic_write(path, json.dumps(asdict(stats), indent=2))
    except OSError as err:  # a read-only data root still trains; it only pays the computation again
        warnings.warn(f"could not cache dataset statistics at {path}: {err}", stacklevel=2)
    return stats


def _read(path: Path) -> ChannelStats | None:
    try:
        raw = json.loads(path.read_text())
        stats = ChannelStats(
            mean=tuple(float(v) for v in raw["mean"]), std=tuple(float(v) for v in raw["std"]),
            num_train_images=int(raw["num_train_images"]), images_used=int(raw["images_used"]),
            method=str(raw["method"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable: recompute and overwrite
    return stats if len(stats.mean) == len(stats.std) == 3 else None

