"""The epoch loop: short functions with the model, data and optimizer passed in (torchvision's reference style)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EvalResult:
    """Validation loss/accuracy and the per-example predictions and losses (in loader order)."""

    loss: float
    acc: float
    pred: np.ndarray
    example_loss: np.ndarray
    target: np.ndarray


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when asked; a no-op elsewhere."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, device: torch.device, *,
                    amp: bool = False, channels_last: bool = False, max_steps: int | None = None,
                    progress=None, on_first_step: Callable[[float], None] | None = None) -> tuple[float, float]:
    """One pass over ``loader``; returns (mean loss, accuracy). A non-finite mean loss is returned as is.

    ``on_first_step(seconds)`` gets the wall time of the first step, device work included (a compiled
    model compiles in it)."""
    model.train()
    # Sums stay on the device so the loop never waits for the GPU; one sync at the end.
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for step, (x, y) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        x, y = _to_device(x, y, device, channels_last)
        start = time.perf_counter()
        with autocast(device, amp):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_first_step is not None and step == 0:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            on_first_step(time.perf_counter() - start)
        loss_sum += loss.detach().double() * y.numel()
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.numel()
        if progress is not None:
            progress.update(1)
    return float(loss_sum) / max(seen, 1), int(correct) / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, amp: bool = False,
             channels_last: bool = False) -> EvalResult:
    """Loss, accuracy and per-example results over ``loader``."""
    model.eval()
    preds, losses, targets = [], [], []
    for x, y in loader:
        x, y = _to_device(x, y, device, channels_last)
        with autocast(device, amp):
            logits = model(x)
        losses.append(F.cross_entropy(logits.float(), y, reduction="none"))
        preds.append(logits.argmax(1))
        targets.append(y)
    loss = torch.cat(losses).cpu().numpy()
    pred = torch.cat(preds).cpu().numpy()
    target = torch.cat(targets).cpu().numpy()
    return EvalResult(float(loss.mean()), float((pred == target).mean()), pred, loss, target)
