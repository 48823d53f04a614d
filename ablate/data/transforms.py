"""Transform recipes of the study we follow, one per dataset family, sized by ``image_size``.

The study trains at 224 pixels; every 224 below is ``image_size`` and the Food-101 test resize of
256 scales with it (``round(image_size * 256 / 224)``) so that the centre crop keeps its share.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision import transforms as T

#: The size the study's recipes are written for; other sizes scale the Food-101 test resize.
RECIPE_SIZE = 224
#: CIFAR's native side: at this size the native CIFAR recipe (pad-and-crop, no resize) applies.
CIFAR_SIDE = 32


def cifar_transform(train: bool, image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """CIFAR-100: resize + flip (train) or resize (test); at 32 px the native RandomCrop(32, pad 4) recipe."""
    if image_size == CIFAR_SIDE:
        steps = [T.RandomCrop(CIFAR_SIDE, padding=4), T.RandomHorizontalFlip()] if train else []
    else:
        steps = [T.Resize(image_size), T.RandomHorizontalFlip()] if train else [T.Resize(image_size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def food_transform(train: bool, image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Food-101 (and imagefolder): RandomResizedCrop + flip (train); resize 256/224 and centre crop (test)."""
    if train:
        steps = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(round(image_size * 256 / RECIPE_SIZE)), T.CenterCrop(image_size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


#: Dataset name -> recipe; imagefolder trees get the Food-101 recipe (photos of varying size).
RECIPES: dict[str, Callable[..., T.Compose]] = {
    "cifar100": cifar_transform,
    "food101": food_transform,
    "imagefolder": food_transform,
}


def build_transform(
    dataset: str, train: bool, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> T.Compose:
    """The train or test transform of ``dataset`` at ``image_size``, normalised with ``mean``/``std``."""
    return RECIPES[dataset](train, image_size, list(mean), list(std))


def upsample(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear resize of a (N, C, H, W) float batch to (N, C, image_size, image_size)."""
    if images.shape[-2:] == (image_size, image_size):
        return images
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
