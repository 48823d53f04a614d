"""Checkpoints: plain data only (tensors, numbers, strings, lists, tuples, dicts), read with ``weights_only=True``.

Loading a checkpoint therefore never runs code, also one that someone else uploaded to a shared tracking server.
Every way a checkpoint can be unusable (unreadable, not plain data, incomplete, another run's) is a
:class:`CheckpointError`: one line naming the checkpoint and the reason (``docs/tracking.md``, "Checkpoints").
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping
from unittest import mock

import numpy as np
import torch

from ablate.config import RunConfig
from ablate.errors import CheckpointError, ConfigError
from ablate.fileio import atomic_open
from ablate.names import CHECKPOINT_DIR, CHECKPOINT_NAME

#: What a checkpoint must hold to rebuild its model.
MODEL_KEYS = ("config", "epoch", "model")
#: What a checkpoint must hold to continue its run.
RESUME_KEYS = (*MODEL_KEYS, "step", "train_sums", "optimizer", "scheduler", "history", "gate_rows", "probe", "preds",
               "losses", "target", "rng")
#: Path of the checkpoint among a run's artifacts.
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_DIR}/{CHECKPOINT_NAME}"


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (plain data only) to ``path`` atomically: a temp file in the same folder, then rename."""
    with atomic_open(path) as fh:
        torch.save(dict(state), fh)


def load_checkpoint(path: str | Path, source: str, keys: tuple[str, ...] = MODEL_KEYS,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check it holds ``keys``; ``source`` names it in errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{source}: checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{source}: checkpoint is not usable (the file is empty)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about foreign pickle protocols; the error below says more
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused is None:  # random bytes and foreign pickles fail in the restricted unpickler too
            raise CheckpointError(f"{source}: checkpoint is not usable (unreadable: not a torch checkpoint)") from None
        raise CheckpointError(f"{source}: checkpoint refused: it holds {refused.group(1)}, not only tensors and "
                              "plain data; nothing in it was run") from None
    except Exception as e:  # noqa: BLE001 - a truncated zip or a foreign format: unreadable
        raise CheckpointError(f"{source}: checkpoint is not usable (unreadable, truncated or not a torch "
                              f"checkpoint: {_one_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: checkpoint is not usable (it holds a {type(state).__name__}, not a dict)")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{source}: checkpoint is not usable (missing {', '.join(missing)})")
    return state


def checkpoint_config(state: Mapping[str, Any], source: str) -> RunConfig:
    """The RunConfig a checkpoint was trained with."""
    try:
        if not isinstance(state["config"], dict):
            raise ConfigError(f"config is a {type(state['config']).__name__}")
        return RunConfig.from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"{source}: checkpoint is not usable (its config is not valid: {e})") from None


def check_matches(cfg: RunConfig, params: Mapping[str, Any], source: str, against: str) -> None:
    """Refuse a checkpoint whose config differs from ``params`` (a run's logged params) in any shared key."""
    mine, theirs = _as_logged(cfg.to_params()), _as_logged(params)
    diff = [k for k in sorted(set(mine) & set(theirs)) if mine[k] != theirs[k]]
    if diff:
        shown = ", ".join(f"{k}={mine[k]} vs {theirs[k]}" for k in diff[:3]) + (", ..." if len(diff) > 3 else "")
        raise CheckpointError(f"{source}: checkpoint belongs to another configuration than {against} ({shown})")


def load_weights(module: torch.nn.Module, weights: Any, source: str, what: str = "model") -> None:
    """``module.load_state_dict(weights)``, a CheckpointError when they do not fit."""
    try:
        module.load_state_dict(weights)
    except Exception as e:  # noqa: BLE001 - wrong keys, shapes or types: another variant's or a damaged state
        raise CheckpointError(f"{source}: checkpoint {what} does not fit this run ({_one_line(e)})") from None


def load_model(path: str | Path, map_location: str | torch.device = "cpu", source: str | None = None,
               params: Mapping[str, str] | None = None) -> tuple[torch.nn.Module, RunConfig]:
    """Rebuild the trained model of a checkpoint and its resolved config (model in eval mode).

    ``params``: the logged params of the run the checkpoint came from; a checkpoint of another config is refused.
    """
    from ablate.models import build_model

    source = source or f"checkpoint {path}"
    state = load_checkpoint(path, source, MODEL_KEYS, map_location)
    cfg = checkpoint_config(state, source)
    if params is not None:
        check_matches(cfg, params, source, "the run's logged params")
    try:
        model = build_model(cfg.model)
    except ConfigError as e:
        raise CheckpointError(f"{source}: checkpoint is not usable (its model cannot be built: {e})") from None
    load_weights(model, state["model"], source)
    return model.to(map_location).eval(), cfg


def fetch_checkpoint(client, run_id: str, keys: tuple[str, ...] = MODEL_KEYS) -> dict[str, Any] | None:
    """The checkpoint of run ``run_id`` from any artifact store (local, HTTP, cloud), or None when it has none.

    The downloaded copy is removed before returning.
    """
    present = {f.path for f in client.list_artifacts(run_id, CHECKPOINT_DIR)}
    if CHECKPOINT_ARTIFACT not in present:
        return None
    # MLflow's download bar would print lines around the one-line error a bad checkpoint gets.
    with tempfile.TemporaryDirectory(prefix="ablate-ckpt-") as tmp, \
            mock.patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
        path = client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, tmp)
        return load_checkpoint(path, f"run {run_id}", keys)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) random states as plain data."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_logged(params: Mapping[str, Any]) -> dict[str, str]:
    """Param values as MLflow stores them (``track.TrackedRun.start`` logs None as ``None``)."""
    return {k: "None" if v is None else str(v) for k, v in params.items()}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())  # one line, whatever the exception printed
    return (text or type(e).__name__)[:200]
