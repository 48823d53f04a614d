"""Prediction churn: is a fluctuating validation loss made of flipped predictions or of confidence?

Input: the arrays of a run's ``val_predictions.npz``: ``pred`` (epochs x N, predicted class),
``loss`` (epochs x N, per-example loss, stored as float16) and ``target`` (N). Row ``e`` of the
arrays is epoch ``e``; every quantity of epoch e compares row e with row e-1, so rows start at 1.
Losses are cast to float64 before any mean: float16 sums over thousands of examples lose digits.

Per-example loss change ``D_i = loss[e, i] - loss[e-1, i]``; ``d_val_loss = mean_i D_i``.
A part P of the examples contributes ``C_P = sum_{i in P} D_i / N`` to d_val_loss, and the rest
contributes ``C_rest``. Its share of the change is ``|C_P| / (|C_P| + |C_rest|)``, in [0, 1]: it equals
``C_P / d_val_loss`` when both parts move the same way, and when they move in opposite directions it
says which part dominates instead of exceeding 1 (NaN when no example's loss changed).

- ``top5_share_of_change``: P = the ceil(5% of N) examples with the highest loss at epoch e
  (ties broken by example index).
- ``stable_pred_share_of_change``: P = the examples whose predicted class did not change from e-1
  to e; a value near 1 means the loss moved through confidence, not through flipped predictions.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ablate.errors import ConfigError

TOP_FRACTION = 0.05
#: ``fluctuation_kind`` says "confidence" when at least this share of the loss movement comes from
#: examples whose prediction did not change
CONFIDENCE_SHARE = 0.5
CHURN_COLUMNS = (
    "epoch", "flip_rate", "forgetting", "learning", "val_loss", "d_val_loss", "top5_share_of_change",
    "acc", "d_acc", "stable_pred_share_of_change",
)


def churn_by_epoch(pred: np.ndarray, loss: np.ndarray, target: np.ndarray) -> pd.DataFrame:
    """One row per epoch e >= 1 comparing it with e-1 (columns ``CHURN_COLUMNS``)."""
    pred, loss, target = _checked(pred, loss, target)
    correct = pred == target[None, :]
    acc = correct.mean(axis=1)
    mean_loss = loss.mean(axis=1)
    rows = []
    for e in range(1, pred.shape[0]):
        delta = loss[e] - loss[e - 1]
        rows.append({
            "epoch": e,
            "flip_rate": float(np.mean(pred[e] != pred[e - 1])),
            "forgetting": float(np.mean(correct[e - 1] & ~correct[e])),
            "learning": float(np.mean(~correct[e - 1] & correct[e])),
            "val_loss": float(mean_loss[e]),
            "d_val_loss": float(mean_loss[e] - mean_loss[e - 1]),
            "top5_share_of_change": _share(*_split_change(delta, _top_mask(loss[e]))),
            "acc": float(acc[e]),
            "d_acc": float(acc[e] - acc[e - 1]),
            "stable_pred_share_of_change": _share(*_split_change(delta, pred[e] == pred[e - 1])),
        })
    return pd.DataFrame(rows, columns=list(CHURN_COLUMNS))


def churn_summary(pred: np.ndarray, loss: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Run-level churn: means over epochs, forgetting events per example, change shares.

    Each share is given as a plain mean over epochs (NaN epochs skipped) and pooled over epochs, sum_e |C_P,e| / sum_e (|C_P,e| + |C_rest,e|), so an epoch
    weighs by how much the loss moved: a near-flat epoch's share is noise and should not count as
    much as a spike's.
    """
    pred, loss, target = _checked(pred, loss, target)
    table = churn_by_epoch(pred, loss, target)
    deltas = np.diff(loss, axis=0)
    top = np.stack([_top_mask(row) for row in loss[1:]]) if len(deltas) else np.zeros_like(deltas, bool)
    stable = pred[1:] == pred[:-1]
    return {
        "n_epochs": float(pred.shape[0]),
        "n_examples": float(pred.shape[1]),
        "flip_rate_mean": _mean(table["flip_rate"]),
        "forgetting_events_per_example": float(table["forgetting"].sum()) if len(table) else float("nan"),
        "learning_events_per_example": float(table["learning"].sum()) if len(table) else float("nan"),
        "top5_share_of_change_mean": _mean(table["top5_share_of_change"]),
        "top5_share_of_change_pooled": _share(*_split_change(deltas, top)),
        "stable_pred_share_of_change_mean": _mean(table["stable_pred_share_of_change"]),
        "stable_pred_share_of_change_pooled": _share(*_split_change(deltas, stable)),
    }


def fluctuation_kind(summary: dict[str, float]) -> str:
    """"confidence" if stable-prediction examples carry >= CONFIDENCE_SHARE of the loss movement,
    "predictions" if less, "undetermined" when the share is NaN (the loss never moved)."""
    share = summary["stable_pred_share_of_change_pooled"]
    if math.isnan(share):
        return "undetermined"
    return "confidence" if share >= CONFIDENCE_SHARE else "predictions"


def _checked(pred, loss, target) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred, loss, target = np.asarray(pred), np.asarray(loss, dtype=np.float64), np.asarray(target)
    if pred.ndim != 2 or loss.shape != pred.shape or target.shape != (pred.shape[1],):
        raise ConfigError(
            f"val_predictions shapes pred={pred.shape}, loss={loss.shape}, target={target.shape} are not valid; "
            "accepted: pred and loss of shape (epochs, N) and target of shape (N,)"
        )
    return pred, loss, target


def _top_mask(epoch_loss: np.ndarray) -> np.ndarray:
    k = math.ceil(TOP_FRACTION * epoch_loss.size)
    # stable sort on -loss: among equal losses the lower example index ranks first
    mask = np.zeros(epoch_loss.size, dtype=bool)
    mask[np.argsort(-epoch_loss, kind="stable")[:k]] = True
    return mask


def _split_change(delta: np.ndarray, part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-epoch absolute change of the part and of the rest (works on one epoch or a stack)."""
    axis = delta.ndim - 1
    return np.abs(np.where(part, delta, 0.0).sum(axis=axis)), np.abs(np.where(part, 0.0, delta).sum(axis=axis))


def _share(part_abs, rest_abs) -> float:
    total = float(np.sum(part_abs) + np.sum(rest_abs))
    return float("nan") if total == 0.0 else float(np.sum(part_abs) / total)


def _mean(values: pd.Series) -> float:
    return float(values.mean()) if values.notna().any() else float("nan")
