"""Training: the epoch loop, evaluation, gate probes, checkpoints and the tracked run."""

from ablate.train.runner import NonFiniteLoss, RunResult, run_training

__all__ = ["NonFiniteLoss", "RunResult", "run_training"]
