"""Checkpoints: written atomically each epoch, read back to resume a run or rebuild its model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ablate.config import RunConfig
from ablate.fileio import atomic_open


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, then rename."""
    with atomic_open(path) as fh:
        torch.save(state, fh)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (holds config, model, optimizer, rng, history)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, RunConfig]:
    """Rebuild the trained model of a checkpoint and its resolved config (model in eval mode)."""
    from ablate.models import build_model

    state = load_checkpoint(path, map_location)
    cfg = RunConfig.from_dict(state["config"])
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    return model.to(map_location).eval(), cfg
