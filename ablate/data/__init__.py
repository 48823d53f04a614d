"""Datasets and loaders: digits (embedded), cifar100, food101 and imagefolder trees."""

from ablate.data.datasets import DataBundle, build_datasets, check_available, make_loaders, probe_batch

__all__ = ["DataBundle", "build_datasets", "check_available", "make_loaders", "probe_batch"]
