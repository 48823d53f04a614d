"""Training: the epoch loop, evaluation, gate probes, checkpoints and the tracked run."""

from ablate.train.runner import EPOCH_METRICS, NonFiniteLoss, RunResult, run_training

__all__ = ["EPOCH_METRICS", "NonFiniteLoss", "RunResult", "run_training"]
