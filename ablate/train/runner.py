"""One tracked training run: data, model, epochs, gate probes, checkpoints and MLflow, start to finish.

Studies call exactly this for each trial (``on_epoch`` reports to Optuna and may prune).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ablate import track
from ablate.config import ConfigError, RunConfig
from ablate.device import PeakMemory, device_name, resolve_device
from ablate.errors import CheckpointError
from ablate.names import (
    CHECKPOINT_DIR, CHECKPOINT_NAME, COMPILE_CHECK_TAG, COMPILE_SECONDS_METRIC, CONFIG_ARTIFACT, DEVICE_TAG,
    FAILURE_TAG, GATE_HEATMAP_ARTIFACT, GATE_STATS_ARTIFACT, GATE_STATS_COLUMNS, HISTORY_ARTIFACT, OPTUNA_STATE_TAG,
    PREDICTIONS_ARTIFACT, RECOMPUTE_PLAN_ARTIFACT, RESUMED_FROM_EPOCH_TAG, RESUMED_FROM_RUN_TAG, SENS_KINDS,
    SUMMARY_METRICS, SUMMARY_PREFIX, VARIANT_TAG, GateKey,
)
from ablate.nn.compile_check import cases as compile_check_cases
from ablate.train.checkpoint import (
    RESUME_KEYS, check_matches, checkpoint_config, fetch_checkpoint, load_weights, rng_state, save_checkpoint,
    set_rng_state,
)


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
                 continue_from: str | None = None, progress: bool = True) -> RunResult:
    """Train ``cfg`` and track it; returns the result. The MLflow run ends FINISHED, FAILED or KILLED.

    ``on_epoch(epoch, metrics)`` is called after each epoch is logged, also for epochs restored from a checkpoint (a
    study reports and prunes there; an exception it raises ends the run, KILLED for ``optuna.TrialPruned``).
    ``on_start(run_id)`` is called once the MLflow run exists. ``resume_run_id`` continues that run from its
    checkpoint (``ablate train --resume``; an unusable checkpoint is a CheckpointError before the run is touched).
    ``continue_from`` starts a new run from the checkpoint of a run whose worker died, tagged
    ``ablate.resumed_from_run`` (from epoch 0 when that run left no usable checkpoint).
    """
    from ablate.data import build_datasets, check_available
    from ablate.data.gpu_decode import check_decode_device

    resume_state, client = None, None
    if resume_run_id:
        client = track.client(tracking_uri)
        cfg, resume_state = _load_resume(client, resume_run_id)
    cfg = cfg.resolved()
    check_available(cfg.data)  # a missing dataset fails before any run exists
    device = resolve_device(cfg.train.device)
    check_decode_device(cfg.data.decode, device)
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    bundle = build_datasets(cfg.data)
    if cfg.model.num_classes is None:
        cfg = replace(cfg, model=replace(cfg.model, num_classes=bundle.num_classes))
    model = _build(cfg, device)
    client = client or track.client(tracking_uri)  # only now: bad input above leaves the store untouched
    if continue_from:
        continue_from, resume_state = _load_continue(client, continue_from, cfg)

    trainer = _Trainer(cfg, model, bundle, device, progress)
    resumed: dict[str, str] = {}
    if resume_state is not None:
        # Every part of the state is loaded before any run changes: a checkpoint that does not fit changes nothing.
        trainer.restore(resume_state, f"run {resume_run_id or continue_from}")
        resumed[RESUMED_FROM_EPOCH_TAG] = str(trainer.start_epoch)
    if resume_run_id:
        run = track.TrackedRun.reopen(client, resume_run_id)
        run.set_tags(resumed)
    else:
        if resume_state is not None:
            resumed[RESUMED_FROM_RUN_TAG] = continue_from
        from ablate.ui import RUN_COLOR_TAG, source_tags, variant_color

        experiment_id = track.ensure_experiment(client, cfg.experiment)
        run = track.TrackedRun.start(
            client, experiment_id, run_name or cfg.run_name or cfg.label(), cfg.to_params(),
            {VARIANT_TAG: cfg.label(), DEVICE_TAG: device_name(device), RUN_COLOR_TAG: variant_color(cfg.label()),
             **source_tags("ablate train"), **(tags or {}), **resumed},
            parent_run_id=parent_run_id,
        )
    if on_start is not None:
        on_start(run.run_id)
    trainer.attach(run)
    with run:
        run.start_system_metrics(device, enabled=cfg.system_metrics)
        if not resume_run_id:
            _log_json(run, cfg.to_dict(), CONFIG_ARTIFACT)
            _log_dataset_inputs(run, cfg, bundle)
        try:
            trainer.log_restored_epochs(on_epoch)
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
                trainer.log_summary()
                run.set_tags({OPTUNA_STATE_TAG: "PRUNED"})
                run.end(track.KILLED)
            raise
        trainer.finish_artifacts(keep_checkpoint=cfg.log_checkpoint)
        trainer.log_summary()
    return RunResult(run.run_id, run.status, len(trainer.history), trainer.history)


def _build(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    from ablate.models import build_model

    model = build_model(cfg.model, seed=cfg.train.seed).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
    return model


def compiled_needs_check(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether compiled training of ``model`` on ``device`` first checks its SCConvs (``ablate.nn.compile_check``):
    efficient SCConvs on CUDA, where inductor once got one wrong (docs/scconv.md, "On a GPU")."""
    return device.type == "cuda" and bool(compile_check_cases(model))


#: Per-eps sensitivities stay history.csv columns: eight series per run that only the report's sensitivity reads.
_SENS_EPS_PREFIXES = tuple(f"sens/{kind}/eps_" for kind in SENS_KINDS)


def _log_dataset_inputs(run: track.TrackedRun, cfg: RunConfig, bundle) -> None:
    """The run's training and validation sets as MLflow dataset inputs (the UI's Dataset column)."""
    from dataclasses import asdict

    from ablate.names import BOOKKEEPING_PARAMS
    from ablate.ui import config_digest, log_dataset_inputs

    values = {k: v for k, v in asdict(cfg.data).items() if k not in BOOKKEEPING_PARAMS}
    log_dataset_inputs(run.client, run.run_id, cfg.data.dataset, config_digest(values), len(bundle.train),
                       len(bundle.val))


def summary_metrics(history: list[dict[str, float]], milestones=(), step_seconds: float = float("nan")
                    ) -> dict[str, float]:
    """The ``summary.*`` metrics of a run's epoch history: best and final val_acc, the val_loss fluctuation of the
    report (``analysis.fluctuation`` from the run's own settle epoch, lr milestones as breaks), peak memory and
    ``step_seconds`` (NaN when unknown)."""
    import math

    import pandas as pd

    # The one place ablate uses analysis: the summary must be the report's own metric, not a second copy of it.
    from analysis.fluctuation import run_metrics, settle_epoch

    if not history:
        return {}
    frame = pd.DataFrame(history).rename_axis("epoch").reset_index()
    breaks = tuple(int(m) for m in milestones or ())
    fluctuation = run_metrics(frame, from_epoch=settle_epoch(frame, breaks=breaks) or 0, breaks=breaks)
    acc = [v for v in frame["val_acc"] if math.isfinite(v)] if "val_acc" in frame else []
    memory = [v for v in frame["peak_memory_mb"] if math.isfinite(v)] if "peak_memory_mb" in frame else []
    values = {
        "best_val_acc": max(acc, default=math.nan),
        "final_val_acc": float(frame["val_acc"].iloc[-1]) if "val_acc" in frame else math.nan,
        "val_loss_resid_sd": fluctuation.get("val_loss.resid_sd", math.nan),
        "val_loss_spike_count": fluctuation.get("val_loss.spike_count", math.nan),
        "peak_memory_mb": max(memory, default=math.nan),
        "step_seconds": step_seconds,
    }
    return {name: float(values[name.removeprefix(SUMMARY_PREFIX)]) for name in SUMMARY_METRICS}


def epoch_metrics(row: Mapping[str, float], gates: Mapping[GateKey, float], gate_mode: str,
                  per_layer: bool = False) -> dict[str, float]:
    """What one epoch logs as metrics: the history row less the per-eps sensitivities (those stay in
    history.csv; ``sens/slope`` is logged), the network-level gate means, and with ``per_layer`` every layer's
    gate statistics as ``<kind>/<layer>/<stat>``."""
    from ablate.ui import gate_aggregates

    metrics = {k: v for k, v in row.items() if not k.startswith(_SENS_EPS_PREFIXES)}
    metrics.update(gate_aggregates(gates, gate_mode))
    if per_layer:
        metrics.update({key.metric_name(): value for key, value in gates.items()})
    return metrics


def _log_json(run: track.TrackedRun, payload: Any, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, name)
        path.write_text(json.dumps(payload, indent=2, default=str))
        run.log_artifact(path)


def _load_resume(client, run_id: str) -> tuple[RunConfig, dict]:
    """The config and checkpoint of run ``run_id`` (from any artifact store), checked against its params."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"resume={run_id!r} is not valid: no such run in {client.tracking_uri}") from None
    state = fetch_checkpoint(client, run_id, RESUME_KEYS)
    if state is None:
        raise ConfigError(f"resume={run_id!r} is not valid: the run has no checkpoint to resume from")
    cfg = checkpoint_config(state, f"run {run_id}")
    check_matches(cfg, run.data.params, f"run {run_id}", "the run's logged params")
    return cfg, state


def _load_continue(client, run_id: str, cfg: RunConfig) -> tuple[str, dict | None]:
    """The run and checkpoint a retried trial continues from: run ``run_id``'s if it fits ``cfg``, else (a dead
    attempt killed before its first checkpoint) the checkpoint of the run that attempt continued, if any."""
    import logging

    seen = set()
    while run_id not in seen:
        seen.add(run_id)
        source = f"run {run_id}"
        try:
            state = fetch_checkpoint(client, run_id, RESUME_KEYS)
            if state is not None:
                check_matches(checkpoint_config(state, source), cfg.to_params(), source, "this trial")
                check_matches(cfg, client.get_run(run_id).data.params, source, "that run's logged params")
                return run_id, state
        except CheckpointError as e:  # the retry still trains the cell, from the start
            logging.getLogger(__name__).warning("%s; training from epoch 0", e)
            return run_id, None
        earlier = client.get_run(run_id).data.tags.get(RESUMED_FROM_RUN_TAG)
        if not earlier:
            break
        run_id = earlier
    return run_id, None


class _Trainer:
    """The state of one run between epochs: optimiser, scheduler, history, probes, predictions."""

    def __init__(self, cfg: RunConfig, model, bundle, device: torch.device, progress: bool):
        from ablate.data import make_loaders, probe_batch
        from ablate.train.probes import GateProbe, SensitivityProbe

        self.cfg, self.model, self.device, self.progress = cfg, model, device, progress
        t = cfg.train
        self.amp = t.amp and device.type == "cuda"
        self.channels_last = t.channels_last and device.type == "cuda"
        self.train_loader, self.val_loader = make_loaders(
            bundle, t.batch_size, t.seed, cfg.data.num_workers, pin_memory=device.type == "cuda", device=device)
        # Training steps go through the compiled module; evaluation and the probes use the eager one (same
        # parameters), so that eval mode and probe switches never trigger another compilation.
        self.step_model = torch.compile(model) if t.compile else model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                                         weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(t.milestones), gamma=t.lr_decay)
        probe_x, probe_y = probe_batch(bundle, cfg.data.probe_size)
        self.image_shape = tuple(probe_x.shape[1:])
        self.probe = GateProbe(model, probe_x)
        self.sensitivity = SensitivityProbe(model, probe_x, probe_y)
        self.history: list[dict[str, float]] = []
        self.gate_rows: list[tuple[int, str, str, str, float]] = []
        self.preds: list[np.ndarray] = []
        self.losses: list[np.ndarray] = []
        self.target: np.ndarray | None = None
        self.start_epoch = 0
        self.step_times: list[float] = []  # training seconds per step of each epoch this process trained
        self.feed = _EpochFeed(self)
        self.memory = PeakMemory(device)
        self.run: track.TrackedRun | None = None
        seed_everything(t.seed)
        if self.probe.active:
            self.probe.baseline_masks(device)

    # -- checkpoint -------------------------------------------------------------------------

    def attach(self, run: track.TrackedRun) -> None:
        """Track into ``run``: checkpoints go straight into a local artifact store, else to a temp folder and are
        uploaded after each write (an HTTP server or a cloud store then holds the latest one during the run)."""
        self.run = run
        self.workdir = Path(tempfile.mkdtemp(prefix="ablate-run-"))
        local = track.local_artifact_dir(run.artifact_uri)
        self.upload = local is None
        self.ckpt_path = (local or self.workdir) / CHECKPOINT_DIR / CHECKPOINT_NAME

    def state(self, epoch: int, step: int | None = None) -> dict:
        """The checkpoint after ``step`` batches of ``epoch`` (None: the epoch is complete), as plain data only."""
        return {
            "config": self.cfg.to_dict(), "epoch": epoch, "step": step,
            "train_sums": self.feed.sums() if step is not None else None,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "probe": self.probe.state_dict(),
            "history": [{k: float(v) for k, v in row.items()} for row in self.history],
            "gate_rows": [(int(e), str(layer), str(kind), str(stat), float(v))
                          for e, layer, kind, stat, v in self.gate_rows],
            "preds": [torch.from_numpy(p) for p in self.preds], "losses": [torch.from_numpy(x) for x in self.losses],
            "target": None if self.target is None else torch.from_numpy(self.target), "rng": rng_state(),
        }

    def save(self, epoch: int, step: int | None = None) -> None:
        """Write the checkpoint atomically and, for a remote artifact store, upload it."""
        save_checkpoint(self.ckpt_path, self.state(epoch, step))
        if self.upload:
            self.run.log_artifact(self.ckpt_path, CHECKPOINT_DIR)
        self.feed.last_save = time.monotonic()

    def restore(self, state: dict, source: str) -> None:
        """Load a checkpoint; weights or optimizer state that do not fit are a CheckpointError."""
        load_weights(self.model, state["model"], source)
        load_weights(self.optimizer, state["optimizer"], source, "optimizer state")
        load_weights(self.scheduler, state["scheduler"], source, "scheduler state")
        load_weights(self.probe, state["probe"], source, "gate probe state")
        try:
            self.history = [dict(row) for row in state["history"]]
            self.gate_rows = [tuple(row) for row in state["gate_rows"]]
            self.preds = [p.numpy() for p in state["preds"]]
            self.losses = [x.numpy() for x in state["losses"]]
            self.target = None if state["target"] is None else state["target"].numpy()
            set_rng_state(state["rng"])
            epoch, step = int(state["epoch"]), state["step"]
            self.feed.resume_at(step, state["train_sums"], state["rng"])
        except (TypeError, KeyError, ValueError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"{source}: checkpoint is not usable (damaged training state: "
                                  f"{type(e).__name__}: {str(e)[:120]})") from None
        if len(self.history) != (epoch + 1 if step is None else epoch):
            raise CheckpointError(f"{source}: checkpoint is not usable (history of {len(self.history)} epochs at "
                                  f"epoch {epoch})")
        self.start_epoch = epoch + 1 if step is None else epoch

    def log_restored_epochs(self, on_epoch) -> None:
        """Log the restored epochs the run lacks (all of them in a new run), one point each, and replay them."""
        logged = self.run.last_logged_step("val_loss")
        for epoch, row in enumerate(self.history):
            metrics = self.epoch_metrics(row, self.gates_of(epoch))
            if epoch > logged:
                self.run.log_metrics(metrics, step=epoch)
            if on_epoch is not None:
                on_epoch(epoch, {**row, **metrics})

    def gates_of(self, epoch: int) -> dict[GateKey, float]:
        """The per-layer gate statistics probed after ``epoch``."""
        return {GateKey(kind, layer, stat): value for e, layer, kind, stat, value in self.gate_rows if e == epoch}

    def epoch_metrics(self, row: Mapping[str, float], gates: Mapping[GateKey, float]) -> dict[str, float]:
        return epoch_metrics(row, gates, self.cfg.model.scconv.gate_mode, self.cfg.gate_metrics_per_layer)

    def log_summary(self) -> None:
        """Log the ``summary.*`` metrics at the last epoch's step (nothing before the first epoch)."""
        if self.history:
            self.run.log_metrics(self.summary(), step=len(self.history) - 1)

    def summary(self) -> dict[str, float]:
        """The run's ``summary.*`` metrics; step time is the median over the epochs this process trained, less
        the first when there are more (warm-up, compilation), of training seconds per step."""
        times = self.step_times[1:] if len(self.step_times) > 1 else self.step_times
        return summary_metrics(self.history, self.cfg.train.milestones,
                               float(np.median(times)) if times else float("nan"))

    # -- epochs -----------------------------------------------------------------------------

    def fit(self, on_epoch) -> None:
        from tqdm.auto import tqdm

        from ablate.train.loop import autocast, evaluate, train_one_epoch

        t = self.cfg.train
        steps = len(self.train_loader) if t.max_steps_per_epoch is None else min(len(self.train_loader),
                                                                                   t.max_steps_per_epoch)
        bar = tqdm(range(self.start_epoch, t.epochs), initial=self.start_epoch, total=t.epochs, unit="epoch",
                   desc=self.cfg.label(), disable=not self.progress, dynamic_ncols=True)
        self.feed.last_save = time.monotonic()
        if self.start_epoch < t.epochs and t.compile and compiled_needs_check(self.model, self.device):
            self.check_compiled()
        if self.start_epoch < t.epochs and self.step_model is self.model:
            self.plan_recompute()
        for epoch in bar:
            # Reseeding the data order per epoch makes a resumed run see the same batches as an uninterrupted one.
            self.train_loader.generator.manual_seed(t.seed * 100_003 + epoch)
            self.memory.reset()
            start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            skip = self.feed.begin(epoch, steps)
            compiling = self.step_model is not self.model and epoch == self.start_epoch
            if compiling:
                print("ablate: compiling the model (torch.compile): the first training step takes minutes on a CPU",
                      file=sys.stderr, flush=True)
            with tqdm(total=steps, initial=skip, unit="step", leave=False, disable=not self.progress,
                      dynamic_ncols=True) as inner, self.feed.counting():
                train_loss, train_acc = train_one_epoch(
                    self.step_model, self.feed, self.optimizer, self.device, amp=self.amp,
                    channels_last=self.channels_last, max_steps=steps - skip, progress=inner,
                    on_first_step=(lambda s: self._compiled(epoch, s)) if compiling else None)
            if steps > skip:
                self.step_times.append((time.perf_counter() - start) / (steps - skip))
            if skip:  # the epoch began in an earlier process: its mean covers every batch
                train_loss, train_acc = self.feed.means()
            if not np.isfinite(train_loss):
                raise NonFiniteLoss(f"training loss is {train_loss} at epoch {epoch}")
            self.scheduler.step()
            result = evaluate(self.model, self.val_loader, self.device, amp=self.amp,
                              channels_last=self.channels_last)
            if not np.isfinite(result.loss):
                raise NonFiniteLoss(f"validation loss is {result.loss} at epoch {epoch}")
            seconds = time.perf_counter() - start + self.feed.earlier_seconds
            gates = self.probe.measure(self.device, autocast(self.device, self.amp))
            row = {"train_loss": train_loss, "train_acc": train_acc, "val_loss": result.loss, "val_acc": result.acc,
                   "lr": lr, "epoch_seconds": seconds, "peak_memory_mb": self.memory.read_mb(),
                   **self.sensitivity.measure(self.device)}
            self.history.append(row)
            for key, value in gates.items():
                self.gate_rows.append((epoch, key.layer, key.kind, key.stat, value))
            self.preds.append(result.pred.astype(np.int16 if self.cfg.model.num_classes < 2**15 else np.int32))
            self.losses.append(result.example_loss.astype(np.float16))
            self.target = result.target
            self.save(epoch)
            metrics = self.epoch_metrics(row, gates)
            self.run.log_metrics(metrics, step=epoch)
            if gates:
                self.log_gate_stats()
            bar.set_postfix(val_loss=f"{result.loss:.4f}", val_acc=f"{result.acc:.3f}")
            if on_epoch is not None:
                on_epoch(epoch, {**row, **metrics})

    def plan_recompute(self) -> None:
        """Choose, from measured cost, which efficient SCConvs recompute in backward (``scconv.recompute = auto``),
        on an input of the training batch's shape; log the plan as an artifact. Eager only: a compiled model
        keeps the ``size`` rule, which the compiler traces as a checkpoint."""
        from ablate.nn.recompute_plan import plan_recompute
        from ablate.train.loop import autocast

        t = self.cfg.train
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        example = torch.randn((t.batch_size, *self.image_shape), generator=torch.Generator().manual_seed(0))
        example = example.to(self.device).contiguous(memory_format=fmt)
        with autocast(self.device, self.amp):
            plan = plan_recompute(self.model, example)
        if plan is None:
            return
        if self.progress:
            print(f"ablate: recompute plan: {plan.summary()}", file=sys.stderr, flush=True)
        _log_json(self.run, plan.to_dict(), RECOMPUTE_PLAN_ARTIFACT)

    def check_compiled(self) -> None:
        """Check the compiled efficient SCConvs against eager mode on this device; where one is wrong (or the check
        cannot compile), train eager, say so in one line and tag the run."""
        from ablate.nn.compile_check import check_compiled_scconvs

        print("ablate: checking the compiled efficient SCConv against eager mode on this device (one small layer of "
              "each kind, kept and recomputed: a compilation each)", file=sys.stderr, flush=True)
        try:
            results = check_compiled_scconvs(self.model, self.device, self.channels_last)
            failed = next((r.describe() for r in results if not r.passed), None)
        except Exception as exc:  # a layer that does not compile here: train eager rather than fail the run
            first_line = (str(exc).splitlines() or [""])[0]
            results, failed = [], f"the check's compilation raised {type(exc).__name__}: {first_line}"
        if failed is None:
            worst = max(r.worst[1] for r in results)
            outcome = f"passed: {len(results)} cases, largest relative error {worst:.1e}"
            print(f"ablate: compiled SCConv check {outcome}", file=sys.stderr, flush=True)
        else:
            self.step_model = self.model
            outcome = f"failed: {failed}; trained eager"
            print(f"ablate: warning: the compiled efficient SCConv failed its check on this device ({failed}); this "
                  "run trains eager. To compile, train with scconv.impl=reference", file=sys.stderr, flush=True)
        self.run.set_tags({COMPILE_CHECK_TAG: outcome})

    def _compiled(self, epoch: int, seconds: float) -> None:
        """The first compiled step is done: say so and log its time as the compile time."""
        print(f"ablate: compiled; the first step took {seconds:.0f} s", file=sys.stderr, flush=True)
        self.run.log_metrics({COMPILE_SECONDS_METRIC: seconds}, step=epoch)

    # -- artifacts --------------------------------------------------------------------------

    def log_gate_stats(self) -> None:
        """(Re)write the per-layer gate statistics of every epoch so far as ``gate_stats.csv``, long form
        ``epoch, kind, layer, stat, value``: after each epoch, so a run that dies keeps them too."""
        import pandas as pd

        out = self.workdir / "gates"
        out.mkdir(exist_ok=True)
        frame = pd.DataFrame(self.gate_rows, columns=["epoch", "layer", "kind", "stat", "value"])
        frame[list(GATE_STATS_COLUMNS)].to_csv(out / GATE_STATS_ARTIFACT, index=False)
        self.run.log_artifact(out / GATE_STATS_ARTIFACT)

    def finish_artifacts(self, keep_checkpoint: bool) -> None:
        """Log the history, gate statistics (table and heatmap) and predictions artifacts; keep or drop the
        checkpoint (uploaded at every write, so nothing is left to upload here)."""
        import pandas as pd

        out = self.workdir / "out"
        out.mkdir(exist_ok=True)
        if self.history:
            pd.DataFrame(self.history).rename_axis("epoch").reset_index().to_csv(out / HISTORY_ARTIFACT, index=False)
            np.savez_compressed(out / PREDICTIONS_ARTIFACT, pred=np.stack(self.preds), loss=np.stack(self.losses),
                                target=self.target)
            for path in sorted(out.iterdir()):
                self.run.log_artifact(path)
            if self.gate_rows:
                from ablate.ui import gate_heatmap_info, gate_heatmap_plot

                self.log_gate_stats()
                info = gate_heatmap_info(self.gate_rows, self.cfg.model.scconv.gate_mode)
                self.run.client.log_figure(self.run.run_id, gate_heatmap_plot(info), GATE_HEATMAP_ARTIFACT)
        if not keep_checkpoint:
            _delete_checkpoint(self.run, self.ckpt_path, self.upload)
        shutil.rmtree(self.workdir, ignore_errors=True)  # the temp copy of an uploaded checkpoint goes too


class _EpochFeed:
    """The training batches of one epoch as ``train_one_epoch`` sees them.

    Between two steps it writes a checkpoint once ``checkpoint_every_minutes`` passed since the last one. An epoch
    resumed from such a checkpoint skips the batches already trained (same order, same augmentations), and its
    training loss and accuracy still cover every batch: they are summed here per step, as the loop sums them.
    """

    def __init__(self, trainer: "_Trainer"):
        self.trainer = trainer
        self.last_save = time.monotonic()
        self.epoch = self.steps = self.skip = self.resume_step = self.seen = 0
        self.resume_sums: dict | None = None
        self.resume_rng: dict | None = None
        self.pending: torch.Tensor | None = None
        self.loss_sum = self.correct = torch.zeros(())
        self.earlier_seconds, self.started = 0.0, time.perf_counter()

    def resume_at(self, step: int | None, sums: dict | None, rng: dict) -> None:
        """Continue inside an epoch after ``step`` batches (None: at an epoch's end) with a checkpoint's sums."""
        self.resume_step = int(step or 0)
        self.resume_sums, self.resume_rng = (dict(sums), rng) if step else (None, None)

    def begin(self, epoch: int, steps: int) -> int:
        """Start ``epoch`` of ``steps`` batches; returns how many of them a mid-epoch checkpoint already trained."""
        sums = self.resume_sums or {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        self.epoch, self.steps, self.skip, self.resume_step, self.resume_sums = epoch, steps, self.resume_step, 0, None
        device = self.trainer.device
        # On the device, like the loop's own sums, so counting never waits for the GPU.
        self.loss_sum = torch.tensor(float(sums["loss_sum"]), dtype=torch.float64, device=device)
        self.correct = torch.tensor(int(sums["correct"]), dtype=torch.int64, device=device)
        self.seen, self.earlier_seconds = int(sums["seen"]), float(sums["seconds"])
        self.started = time.perf_counter()
        return self.skip

    def sums(self) -> dict:
        """What the epoch trained so far, for a mid-epoch checkpoint."""
        return {"loss_sum": float(self.loss_sum), "correct": int(self.correct), "seen": self.seen,
                "seconds": self.earlier_seconds + time.perf_counter() - self.started}

    def means(self) -> tuple[float, float]:
        """(mean training loss, accuracy) over every batch of the epoch, also those trained before a resume."""
        return float(self.loss_sum) / max(self.seen, 1), int(self.correct) / max(self.seen, 1)

    @contextlib.contextmanager
    def counting(self):
        """Sum each training step's loss and correct predictions while the epoch runs."""
        handle = self.trainer.step_model.register_forward_hook(self._count)  # outside a compiled forward
        try:
            yield
        finally:
            handle.remove()
            self.pending = None

    def _count(self, module, inputs, output) -> None:
        if not module.training or self.pending is None:
            return
        y, self.pending = self.pending.to(output.device, non_blocking=True), None
        logits = output.detach()
        self.loss_sum += F.cross_entropy(logits, y).double() * y.numel()  # the loop's own loss expression
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += y.numel()

    def __iter__(self):
        batches = iter(self.trainer.train_loader)
        for _ in range(self.skip):
            next(batches)
        if self.skip:
            set_rng_state(self.resume_rng)  # the skipped batches drew their augmentations; continue from the save
        every = self.trainer.cfg.checkpoint_every_minutes * 60
        step = self.skip
        while True:
            # Here the previous step's optimizer update is done and the next batch not yet drawn.
            if self.skip < step < self.steps and time.monotonic() - self.last_save >= every:
                self.trainer.save(self.epoch, step)
            try:
                x, y = next(batches)
            except StopIteration:
                return
            self.pending = y
            yield x, y
            step += 1


def _delete_checkpoint(run: track.TrackedRun, path: Path, uploaded: bool) -> None:
    """Remove a run's checkpoint: the local file, and the uploaded copy from a remote artifact store."""
    import logging

    written = path.exists()
    shutil.rmtree(path.parent, ignore_errors=True)
    if not (uploaded and written):
        return
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        get_artifact_repository(run.artifact_uri, tracking_uri=run.client.tracking_uri).delete_artifacts(CHECKPOINT_DIR)
    except Exception as e:  # noqa: BLE001 - a store that cannot delete keeps it; the run's result stands
        logging.getLogger(__name__).warning("could not delete the checkpoint of run %s: %s", run.run_id, e)
