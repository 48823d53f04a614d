"""Datasets: the embedded ``digits`` default, CIFAR-100, Food-101 and any train/val image folder.

``check_available(cfg)`` is the cheap, side-effect-free test that the files are there (callers run
it before creating an MLflow run); ``build_datasets(cfg)`` reads them with torchvision's loaders and
the study's transform recipes; ``make_loaders`` and ``probe_batch`` turn a bundle into batches.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.datasets import CIFAR100, Food101, ImageFolder
from torchvision.datasets.vision import StandardTransform

from ablate.config import ConfigError, DataConfig
from ablate.data.gpu_decode import DecodingLoader, DeviceDecode, JpegFiles, jpeg_samples
from ablate.data.stats import ChannelStats, array_stats, cache_path, cached_stats, sampled_stats
from ablate.data.transforms import build_transform, upsample
from ablate.device import available_cpus

#: The digits split is fixed (not the run seed) so every run of a study validates on the same images.
DIGITS_SPLIT_SEED = 0
DIGITS_VAL_SHARE = 0.2
#: Seed of the permutation whose first n validation images form the gate-probe batch.
PROBE_SEED = 0
#: Seed of the digits' noisy relabelling and of the training subset: fixed, so every run sees the same labels.
DIGITS_NOISE_SEED = 0

#: Paths (relative to data_root) that must exist before a dataset can be read; the first missing
#: one is named in the error.
REQUIRED: dict[str, tuple[str, ...]] = {
    "digits": (),
    "cifar100": ("cifar-100-python", "cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
    "food101": ("food-101", "food-101/images", "food-101/meta/train.json", "food-101/meta/test.json"),
    "imagefolder": ("train", "val"),
}
DOWNLOADABLE = ("cifar100", "food101")


@dataclass
class DataBundle:
    """Train and validation sets of one run, with the class names and the normalisation used."""

    train: Dataset
    val: Dataset
    num_classes: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: With ``decode = "gpu"``: the (train, val) decoders of the ``JpegFiles`` sets' batches; None otherwise.
    decode: tuple[DeviceDecode, DeviceDecode] | None = None


class CIFAR100Files(CIFAR100):
    """torchvision's CIFAR100 that checks the pickles exist instead of checking their md5 sums.

    Integrity is checked where corruption happens, at download (torchvision verifies the archive's
    md5); hashing 180 MB of pickles on every build costs time and rejects the small trees tests write.
    Parsing, the download and everything else stay torchvision's own code.
    """

    meta = {**CIFAR100.meta, "md5": None}  # check_integrity(path, None) in _load_meta: the file exists

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)


def data_root(cfg: DataConfig) -> Path:
    """The configured data root with ``~`` expanded, as an absolute path."""
    return Path(cfg.data_root).expanduser().absolute()


def check_available(cfg: DataConfig) -> None:
    """Raise ConfigError (one line: dataset, path, how to fix) when the dataset is not on disk; cheap."""
    root = data_root(cfg)
    missing = next((root / rel for rel in REQUIRED[cfg.dataset] if not (root / rel).exists()), None)
    if missing is None or (cfg.download and cfg.dataset in DOWNLOADABLE):
        return
    if cfg.dataset in DOWNLOADABLE:
        raise ConfigError(
            f"dataset {cfg.dataset!r} not found at {missing}; pass --download to fetch it with "
            "torchvision's downloader, or --data-root to point at it"
        )
    raise ConfigError(
        f"dataset {cfg.dataset!r} not found at {missing}; pass --data-root to point at a folder holding "
        "train/ and val/ with one sub-folder per class (--download does not apply to image folders)"
    )


def build_datasets(cfg: DataConfig) -> DataBundle:
    """Read the configured dataset into a train/val bundle with the recipe's transforms."""
    cfg = cfg.resolved()
    check_available(cfg)
    bundle = _BUILDERS[cfg.dataset](cfg)
    return _encoded(bundle, cfg.image_size) if cfg.decode == "gpu" else bundle


def _encoded(bundle: DataBundle, image_size: int) -> DataBundle:
    """The bundle with file-bytes datasets and the recipe as device decoders (``decode = "gpu"``)."""
    return DataBundle(
        JpegFiles(jpeg_samples(bundle.train), bundle.classes), JpegFiles(jpeg_samples(bundle.val), bundle.classes),
        bundle.num_classes, bundle.classes, bundle.mean, bundle.std,
        decode=(DeviceDecode(True, image_size, bundle.mean, bundle.std),
                DeviceDecode(False, image_size, bundle.mean, bundle.std)),
    )


# -- digits -----------------------------------------------------------------------------------


def _build_digits(cfg: DataConfig) -> DataBundle:
    """scikit-learn's bundled 8x8 digits as in-memory tensors, made hard enough to keep val loss above 0.

    The defaults (``ablate.config.DIGITS_DEFAULTS``; measured in docs/scconv.md, "The embedded digits") keep
    the native 8x8 (upsampling adds no information), relabel a fixed 20 % of all images (train and val) to
    another class, and train on a fixed stratified 500 of the 1437 training images. On the clean set a
    ResNet-20 drives val loss towards 0 and the fluctuation of that curve is noise over noise; the noisy
    validation labels put a floor under val loss (about 0.94 nats for a perfect model at 20 %).
    ``image_size=32, label_noise=0, train_size=1437`` is the old, easy task. No augmentation: identical
    epochs keep the runs of a study comparable, and an epoch is a few tensor slices.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    images = upsample(torch.from_numpy(raw.images / 16.0).float().unsqueeze(1), cfg.image_size)
    labels = torch.from_numpy(noisy_labels(raw.target, len(raw.target_names), cfg.label_noise, DIGITS_NOISE_SEED))
    # The split and the subset stratify on the true digits, so every class keeps its share whatever the noise.
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_VAL_SHARE, stratify=raw.target, random_state=DIGITS_SPLIT_SEED
    )
    if cfg.train_size > len(train_idx):
        raise ConfigError(f"train_size={cfg.train_size!r} is not valid; accepted: an integer in [10, {len(train_idx)}]")
    if cfg.train_size < len(train_idx):
        train_idx, _ = train_test_split(train_idx, train_size=cfg.train_size, stratify=raw.target[train_idx],
                                        random_state=DIGITS_NOISE_SEED)
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    mean, std = images[train_idx].mean().item(), images[train_idx].std(unbiased=False).item()
    images = (images - mean) / std

    def split(idx: Tensor) -> TensorDataset:
        # One grey channel shown as three: expand() after indexing is a view, so memory stays one channel's.
        return TensorDataset(images[idx].expand(-1, 3, -1, -1), labels[idx])

    return DataBundle(
        train=split(train_idx),
        val=split(val_idx),
        num_classes=len(raw.target_names),
        classes=[str(c) for c in raw.target_names],
        mean=(mean,) * 3,
        std=(std,) * 3,
    )


def noisy_labels(labels: np.ndarray, num_classes: int, share: float, seed: int) -> np.ndarray:
    """A copy of ``labels`` where round(share * n) of them, chosen with ``seed``, become another class."""
    rng = np.random.default_rng(seed)
    out = labels.astype(np.int64).copy()
    picked = rng.permutation(len(out))[: round(share * len(out))]
    # A shift of 1..K-1 always lands on another class, uniformly among them.
    out[picked] = (out[picked] + rng.integers(1, num_classes, size=len(picked))) % num_classes
    return out


# -- torchvision datasets ---------------------------------------------------------------------


def _build_cifar100(cfg: DataConfig) -> DataBundle:
    root = str(data_root(cfg))

    def split(train: bool, transform=None) -> CIFAR100Files:
        return CIFAR100Files(root, train=train, transform=transform, download=cfg.download)

    return _assemble(cfg, split(True), lambda tf: split(False, tf), lambda ds: array_stats(ds.data))


def _build_food101(cfg: DataConfig) -> DataBundle:
    root = str(data_root(cfg))

    def split(name: str, transform=None) -> Food101:
        return Food101(root, split=name, transform=transform, download=cfg.download)

    return _assemble(cfg, split("train"), lambda tf: split("test", tf), _sample_stats)


def _build_imagefolder(cfg: DataConfig) -> DataBundle:
    root = data_root(cfg)
    train = _image_folder(root / "train")
    return _assemble(cfg, train, lambda tf: _image_folder(root / "val", tf, train.classes), _sample_stats)


def _assemble(
    cfg: DataConfig,
    train: Dataset,
    make_val: Callable[[Callable], Dataset],
    stats_of: Callable[[Dataset], ChannelStats],
) -> DataBundle:
    """Stats from the untransformed training set (cached), then the recipe's transforms on both splits."""
    stats = cached_stats(cache_path(data_root(cfg), cfg.dataset), len(train), lambda: stats_of(train))
    # The train set is built untransformed so the stats can read raw images; its recipe goes on now.
    train.transform = build_transform(cfg.dataset, True, cfg.image_size, stats.mean, stats.std)
    train.transforms = StandardTransform(train.transform, train.target_transform)  # keep VisionDataset consistent
    val = make_val(build_transform(cfg.dataset, False, cfg.image_size, stats.mean, stats.std))
    return DataBundle(train, val, len(train.classes), list(train.classes), stats.mean, stats.std)


def _sample_stats(ds: Dataset) -> ChannelStats:
    return sampled_stats(len(ds), lambda i: ds[i][0])


class _ImageFolderWithClasses(ImageFolder):
    """ImageFolder whose classes are given (the train split's) rather than read from its own folders."""

    def __init__(self, root: Path, classes: list[str], transform=None) -> None:
        self._given = list(classes)
        super().__init__(str(root), transform=transform, allow_empty=True)  # val may lack a class

    def find_classes(self, directory):
        return self._given, {c: i for i, c in enumerate(self._given)}


def _image_folder(path: Path, transform=None, classes: list[str] | None = None) -> ImageFolder:
    """An ImageFolder over ``path``; with ``classes``, labels follow them and unknown folders are errors."""
    if classes is not None:
        known = set(classes)
        extra = sorted(e.name for e in os.scandir(path) if e.is_dir() and e.name not in known)
        if extra:
            raise ConfigError(
                f"dataset 'imagefolder': {path} has class folders not in train/: {', '.join(extra[:5])}; "
                "classes come from train/"
            )
    try:
        if classes is None:
            return ImageFolder(str(path), transform=transform)
        return _ImageFolderWithClasses(path, classes, transform)
    except FileNotFoundError as err:  # no class folders, or a class without images
        raise ConfigError(f"dataset 'imagefolder' at {path}: {err}".replace("\n", " ")) from None


_BUILDERS: dict[str, Callable[[DataConfig], DataBundle]] = {
    "digits": _build_digits,
    "cifar100": _build_cifar100,
    "food101": _build_food101,
    "imagefolder": _build_imagefolder,
}


# -- batches ----------------------------------------------------------------------------------


#: ``num_workers = "auto"`` never starts more loader processes than this (each holds its own copy of the
#: dataset's index and prefetches two batches).
MAX_AUTO_WORKERS = 16


def resolve_workers(num_workers: int | str, dataset: Dataset) -> int:
    """``auto``: 0 for in-memory tensors (workers would only add copies), else the CPU cores this run may use."""
    if num_workers != "auto":
        return num_workers
    if isinstance(dataset, TensorDataset):
        return 0
    return min(available_cpus(), MAX_AUTO_WORKERS)


def sharing_problem() -> str | None:
    """Why this machine cannot hand tensors between processes as loader workers do, or None when it can.

    A worker hands each batch to the training process through shared memory; with PyTorch's default
    ``file_descriptor`` strategy the batch's memory is sent as a duplicated file descriptor. Where that
    fails (seen on a GPU virtual machine: ``os.dup`` gave ``EBADF``), the failure is raised in the worker's
    queue thread, the worker lives on, and the training process waits for its batches forever. The same
    steps on a one-element tensor, in this process, find it first.
    """
    try:
        storage = torch.empty(1).untyped_storage()
        if torch.multiprocessing.get_sharing_strategy() == "file_system":
            storage._share_filename_cpu_()
        else:
            fd, _ = storage._share_fd_cpu_()
            os.close(os.dup(fd))
    except AttributeError:  # a PyTorch without these storage methods: nothing to check with
        return None
    except (OSError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def make_loaders(
    bundle: DataBundle, batch_size: int, seed: int, num_workers: int | str = "auto", pin_memory: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[DataLoader, DataLoader]:
    """Train loader shuffled by a generator seeded with ``seed`` (same seed, same order); val in order.

    Worker processes are seeded from that generator as well (torch seeds each worker's torch, numpy
    and python RNGs from a base seed drawn from it); with ``num_workers=0`` augmentations draw from
    the global torch RNG, which the training loop seeds. A ``decode = "gpu"`` bundle's batches come out
    decoded and transformed on ``device``.
    """
    workers = resolve_workers(num_workers, bundle.train)
    if workers > 0 and (problem := sharing_problem()) is not None:
        print(f"ablate: loader workers cannot share batches with this process here ({problem}): "
              f"loading in this process instead (num_workers=0)", file=sys.stderr, flush=True)
        workers = 0

    def loader(ds: Dataset, shuffle: bool, generator_seed: int, decode: DeviceDecode | None) -> DataLoader:
        kwargs = dict(
            batch_size=batch_size, shuffle=shuffle, drop_last=False, num_workers=workers,
            pin_memory=pin_memory, persistent_workers=workers > 0,
            # Each loader owns its generator, so evaluating never shifts the global RNG or the train order.
            generator=torch.Generator().manual_seed(generator_seed),
        )
        if decode is not None:
            return DecodingLoader(ds, decode, torch.device(device), **kwargs)
        return DataLoader(ds, **kwargs)

    train_decode, val_decode = bundle.decode or (None, None)
    return loader(bundle.train, True, seed, train_decode), loader(bundle.val, False, seed, val_decode)


def probe_batch(bundle: DataBundle, n: int) -> tuple[Tensor, Tensor]:
    """A fixed batch of min(n, len(val)) validation images and labels: the same images on every call."""
    order = torch.randperm(len(bundle.val), generator=torch.Generator().manual_seed(PROBE_SEED))
    items = [bundle.val[i] for i in order[: min(n, len(bundle.val))].tolist()]
    if bundle.decode is not None:  # file bytes: decoded here on the CPU, by the same code as on the GPU
        images = bundle.decode[1]([x for x, _ in items], "cpu")
    else:
        images = torch.stack([torch.as_tensor(x) for x, _ in items])
    labels = torch.as_tensor([int(y) for _, y in items], dtype=torch.long)
    return images, labels
