"""JPEG decoding on the GPU (``DataConfig.decode = "gpu"``): the loader reads file bytes, the device decodes.

The loader workers then only read files; ``torchvision.io.decode_jpeg`` decodes a whole batch on CUDA
(nvJPEG) and the recipe's transforms (``ablate.data.transforms.food_transform``: RandomResizedCrop and
flip for training, resize and centre crop for evaluation) run per image on the device with torchvision's
v2 transforms, then the batch is normalised. The same code runs on the CPU, which the gate-probe batch
and the tests use; training with it requires CUDA (``check_decode_device``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2

from ablate.data.transforms import RECIPE_SIZE
from ablate.errors import ConfigError


class JpegFiles(Dataset):
    """(file bytes as a uint8 tensor, label) for each (path, label) in ``samples``."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: list[str]) -> None:
        self.samples = [(str(path), int(label)) for path, label in samples]
        self.classes = classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return read_file(path), label


def jpeg_samples(ds: Dataset) -> list[tuple[str, int]]:
    """(path, label) of every image of a torchvision Food101 or ImageFolder dataset."""
    if hasattr(ds, "samples"):  # ImageFolder
        return list(ds.samples)
    return [(str(p), label) for p, label in zip(ds._image_files, ds._labels)]  # Food101


def collate_encoded(batch: list[tuple[Tensor, int]]) -> tuple[list[Tensor], Tensor]:
    """Files differ in length, so a batch is a list of byte tensors and a label tensor."""
    return [data for data, _ in batch], torch.tensor([label for _, label in batch], dtype=torch.long)


class DeviceDecode:
    """Decode a list of JPEG byte tensors on ``device`` and apply the recipe there: a float batch (N, 3, S, S)."""

    def __init__(self, train: bool, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        if train:
            self.per_image = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])
        else:
            self.per_image = v2.Compose([v2.Resize(round(image_size * 256 / RECIPE_SIZE), antialias=True),
                                         v2.CenterCrop(image_size)])
        self.mean, self.std = list(mean), list(std)

    def __call__(self, encoded: list[Tensor], device: torch.device | str) -> Tensor:
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        batch = torch.stack([self.per_image(image) for image in images])
        batch = v2.functional.to_dtype(batch, torch.float32, scale=True)
        return v2.functional.normalize(batch, self.mean, self.std)


class DecodingLoader(DataLoader):
    """A DataLoader of ``JpegFiles`` whose batches come out decoded and transformed on ``device``."""

    def __init__(self, dataset: JpegFiles, decode: DeviceDecode, device: torch.device, **kwargs) -> None:
        super().__init__(dataset, collate_fn=collate_encoded, **kwargs)
        self.decode, self.device = decode, device

    def __iter__(self):
        for encoded, labels in super().__iter__():
            yield self.decode(encoded, self.device), labels


def check_decode_device(decode: str, device: torch.device) -> None:
    """Raise a one-line ConfigError when ``decode = "gpu"`` meets a device without CUDA."""
    if decode == "gpu" and device.type != "cuda":
        raise ConfigError(f"decode='gpu' is not valid with device={device.type!r}: it decodes with nvJPEG on CUDA; "
                          "accepted: decode=cpu on this device")
