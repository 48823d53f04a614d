"""One tracked training run: data, model, epochs, gate probes, checkpoints and MLflow, start to finish.

Studies call exactly this for each trial (``on_epoch`` reports to Optuna and may prune).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ablate import track
from ablate.config import ConfigError, RunConfig
from ablate.device import PeakMemory, device_name, resolve_device
from ablate.names import (
    CHECKPOINT_DIR, CHECKPOINT_NAME, CONFIG_ARTIFACT, DEVICE_TAG, FAILURE_TAG, GATE_STATS_ARTIFACT, HISTORY_ARTIFACT,
    OPTUNA_STATE_TAG, PREDICTIONS_ARTIFACT, VARIANT_TAG,
)
from ablate.train.checkpoint import load_checkpoint, save_checkpoint


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class RunResult:
    """What a finished (or stopped) run produced."""

    run_id: str
    status: str
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    failure: str | None = None

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the data order has its own generator, reseeded per epoch)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_training(cfg: RunConfig, *, tracking_uri: str | None = None, parent_run_id: str | None = None,
                 run_name: str | None = None, tags: Mapping[str, str] | None = None,
                 on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                 on_start: Callable[[str], None] | None = None, resume_run_id: str | None = None,
                 progress: bool = True) -> RunResult:
    """Train ``cfg`` and track it; returns the result. The MLflow run ends FINISHED, FAILED or KILLED.

    ``on_epoch(epoch, metrics)`` is called after each epoch is logged (a study reports and prunes there; an
    exception it raises ends the run, KILLED for ``optuna.TrialPruned``). ``on_start(run_id)`` is called once the
    MLflow run exists.
    """
    from ablate.data import build_datasets, check_available

    resume_state, client = None, None
    if resume_run_id:
        client = track.client(tracking_uri)
        cfg, resume_state = _load_resume(client, resume_run_id)
    cfg = cfg.resolved()
    check_available(cfg.data)  # a missing dataset fails before any run exists
    device = resolve_device(cfg.train.device)
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    bundle = build_datasets(cfg.data)
    if cfg.model.num_classes is None:
        cfg = replace(cfg, model=replace(cfg.model, num_classes=bundle.num_classes))
    model = _build(cfg, device)
    client = client or track.client(tracking_uri)  # only now: bad input above leaves the store untouched

    if resume_state is not None:
        run = track.TrackedRun.reopen(client, resume_run_id)
    else:
        experiment_id = track.ensure_experiment(client, cfg.experiment)
        run = track.TrackedRun.start(
            client, experiment_id, run_name or cfg.run_name or cfg.label(), cfg.to_params(),
            {VARIANT_TAG: cfg.label(), DEVICE_TAG: device_name(device), **(tags or {})},
            parent_run_id=parent_run_id,
        )
    if on_start is not None:
        on_start(run.run_id)
    trainer = _Trainer(cfg, model, bundle, device, run, progress)
    with run:
        run.start_system_metrics()
        if resume_state is not None:
            trainer.restore(resume_state)
        else:
            _log_json(run, cfg.to_dict(), CONFIG_ARTIFACT)
        try:
            trainer.fit(on_epoch)
        except NonFiniteLoss as exc:
            run.set_tags({FAILURE_TAG: "nonfinite_loss"})
            run.end(track.FAILED)
            trainer.finish_artifacts(keep_checkpoint=False)
            return RunResult(run.run_id, track.FAILED, len(trainer.history), trainer.history, str(exc))
        except BaseException as exc:
            import optuna

            trainer.finish_artifacts(keep_checkpoint=True)  # what ran stays inspectable and resumable
            if isinstance(exc, optuna.TrialPruned):
                run.set_tags({OPTUNA_STATE_TAG: "PRUNED"})
                run.end(track.KILLED)
            raise
        trainer.finish_artifacts(keep_checkpoint=cfg.log_checkpoint)
    return RunResult(run.run_id, run.status, len(trainer.history), trainer.history)


def _build(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    from ablate.models import build_model

    model = build_model(cfg.model, seed=cfg.train.seed).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
    return model


def _log_json(run: track.TrackedRun, payload: Any, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, name)
        path.write_text(json.dumps(payload, indent=2, default=str))
        run.log_artifact(path)


def _load_resume(client, run_id: str) -> tuple[RunConfig, dict]:
    """The config and checkpoint of run ``run_id``, for ``--resume``."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"resume={run_id!r} is not valid: no such run in {client.tracking_uri}") from None
    ckpt = _checkpoint_path(run.info.artifact_uri)
    if ckpt is None or not ckpt.exists():
        raise ConfigError(f"resume={run_id!r} is not valid: the run has no checkpoint to resume from")
    state = load_checkpoint(ckpt)
    return RunConfig.from_dict(state["config"]), state


def _checkpoint_path(artifact_uri: str) -> Path | None:
    local = track.local_artifact_dir(artifact_uri)
    return None if local is None else local / CHECKPOINT_DIR / CHECKPOINT_NAME


class _Trainer:
    """The state of one run between epochs: optimiser, scheduler, history, probes, predictions."""

    def __init__(self, cfg: RunConfig, model, bundle, device: torch.device, run: track.TrackedRun, progress: bool):
        from ablate.data import make_loaders, probe_batch
        from ablate.train.probes import GateProbe, SensitivityProbe

        self.cfg, self.model, self.device, self.run, self.progress = cfg, model, device, run, progress
        t = cfg.train
        self.amp = t.amp and device.type == "cuda"
        self.channels_last = t.channels_last and device.type == "cuda"
        self.train_loader, self.val_loader = make_loaders(
            bundle, t.batch_size, t.seed, cfg.data.num_workers, pin_memory=device.type == "cuda")
        self.optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                                         weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(t.milestones), gamma=t.lr_decay)
        probe_x, probe_y = probe_batch(bundle, cfg.data.probe_size)
        self.probe = GateProbe(model, probe_x)
        self.sensitivity = SensitivityProbe(model, probe_x, probe_y)
        self.history: list[dict[str, float]] = []
        self.gate_rows: list[tuple[int, str, str, str, float]] = []
        self.preds: list[np.ndarray] = []
        self.losses: list[np.ndarray] = []
        self.target: np.ndarray | None = None
        self.start_epoch = 0
        self.memory = PeakMemory(device)
        self.workdir = Path(tempfile.mkdtemp(prefix="ablate-run-"))
        local = track.local_artifact_dir(run.artifact_uri)
        # Checkpoints go straight into a local artifact store (resumable by run id); else a temp dir.
        self.ckpt_path = (local or self.workdir) / CHECKPOINT_DIR / CHECKPOINT_NAME
        seed_everything(t.seed)
        if self.probe.active:
            self.probe.baseline_masks(device)

    # -- checkpoint -------------------------------------------------------------------------

    def state(self, epoch: int) -> dict:
        return {
            "config": self.cfg.to_dict(), "epoch": epoch, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "history": self.history, "gate_rows": self.gate_rows, "probe": self.probe.state_dict(),
            "preds": self.preds, "losses": self.losses, "target": self.target,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.probe.load_state_dict(state["probe"])
        self.history, self.gate_rows = state["history"], state["gate_rows"]
        self.preds, self.losses, self.target = state["preds"], state["losses"], state["target"]
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.start_epoch = state["epoch"] + 1
        # Epochs checkpointed but not yet logged (killed in between) are logged now, so each has one point.
        logged = self.run.last_logged_step("val_loss")
        for epoch, row in enumerate(self.history):
            if epoch > logged:
                self.run.log_metrics(_epoch_metrics(row, self.gate_rows, epoch), step=epoch)

    # -- epochs -----------------------------------------------------------------------------

    def fit(self, on_epoch) -> None:
        from tqdm.auto import tqdm

        from ablate.train.loop import autocast, evaluate, train_one_epoch

        t = self.cfg.train
        steps = len(self.train_loader) if t.max_steps_per_epoch is None else min(len(self.train_loader),
                                                                                   t.max_steps_per_epoch)
        bar = tqdm(range(self.start_epoch, t.epochs), initial=self.start_epoch, total=t.epochs, unit="epoch",
                   desc=self.cfg.label(), disable=not self.progress, dynamic_ncols=True)
        for epoch in bar:
            # Reseeding the data order per epoch makes a resumed run see the same batches as an uninterrupted one.
            self.train_loader.generator.manual_seed(t.seed * 100_003 + epoch)
            self.memory.reset()
            start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            with tqdm(total=steps, unit="step", leave=False, disable=not self.progress, dynamic_ncols=True) as inner:
                train_loss, train_acc = train_one_epoch(
                    self.model, self.train_loader, self.optimizer, self.device, amp=self.amp,
                    channels_last=self.channels_last, max_steps=t.max_steps_per_epoch, progress=inner)
            if not np.isfinite(train_loss):
                raise NonFiniteLoss(f"training loss is {train_loss} at epoch {epoch}")
            self.scheduler.step()
            result = evaluate(self.model, self.val_loader, self.device, amp=self.amp,
                              channels_last=self.channels_last)
            if not np.isfinite(result.loss):
                raise NonFiniteLoss(f"validation loss is {result.loss} at epoch {epoch}")
            seconds = time.perf_counter() - start
            gates = self.probe.measure(self.device, autocast(self.device, self.amp))
            row = {"train_loss": train_loss, "train_acc": train_acc, "val_loss": result.loss, "val_acc": result.acc,
                   "lr": lr, "epoch_seconds": seconds, "peak_memory_mb": self.memory.read_mb(),
                   **self.sensitivity.measure(self.device, autocast(self.device, self.amp))}
            self.history.append(row)
            for key, value in gates.items():
                self.gate_rows.append((epoch, key.layer, key.kind, key.stat, value))
            self.preds.append(result.pred.astype(np.int16 if self.cfg.model.num_classes < 2**15 else np.int32))
            self.losses.append(result.example_loss.astype(np.float16))
            self.target = result.target
            save_checkpoint(self.ckpt_path, self.state(epoch))
            metrics = {**row, **{key.metric_name(): value for key, value in gates.items()}}
            self.run.log_metrics(metrics, step=epoch)
            bar.set_postfix(val_loss=f"{result.loss:.4f}", val_acc=f"{result.acc:.3f}")
            if on_epoch is not None:
                on_epoch(epoch, metrics)

    # -- artifacts --------------------------------------------------------------------------

    def finish_artifacts(self, keep_checkpoint: bool) -> None:
        """Log the history, gate statistics and predictions artifacts; keep or drop the checkpoint."""
        import pandas as pd

        out = self.workdir / "out"
        out.mkdir(exist_ok=True)
        if self.history:
            pd.DataFrame(self.history).rename_axis("epoch").reset_index().to_csv(out / HISTORY_ARTIFACT, index=False)
            pd.DataFrame(self.gate_rows, columns=["epoch", "layer", "kind", "stat", "value"]).to_csv(
                out / GATE_STATS_ARTIFACT, index=False)
            np.savez_compressed(out / PREDICTIONS_ARTIFACT, pred=np.stack(self.preds), loss=np.stack(self.losses),
                                target=self.target)
            for path in sorted(out.iterdir()):
                self.run.log_artifact(path)
        local_ckpt = track.local_artifact_dir(self.run.artifact_uri) is not None
        if keep_checkpoint and not local_ckpt and self.ckpt_path.exists():
            self.run.log_artifact(self.ckpt_path, CHECKPOINT_DIR)
        if not keep_checkpoint and local_ckpt:
            shutil.rmtree(self.ckpt_path.parent, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _epoch_metrics(row: dict[str, float], gate_rows, epoch: int) -> dict[str, float]:
    gates = {f"{kind}/{layer}/{stat}": value for e, layer, kind, stat, value in gate_rows if e == epoch}
    return {**row, **gates}
