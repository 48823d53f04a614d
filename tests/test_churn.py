"""Churn on hand-built prediction arrays whose answers can be worked out on paper."""

import math

import numpy as np
import pytest

from ablate.config import ConfigError
from analysis.churn import CHURN_COLUMNS, churn_by_epoch, churn_summary, fluctuation_kind

TARGET = np.array([0, 1, 2, 3])
PRED = np.array([
    [0, 1, 2, 0],  # correct: T T T F
    [0, 1, 0, 3],  # examples 2 and 3 flip: 2 is forgotten, 3 is learned
    [0, 1, 0, 3],  # no flips
])
# float16-exact values, as val_predictions.npz stores them
LOSS = np.array([
    [0.5, 0.5, 0.5, 2.0],
    [0.25, 0.5, 2.0, 1.0],  # change: -0.25, 0, +1.5, -1.0
    [0.25, 0.5, 3.0, 1.0],  # change: 0, 0, +1, 0
], dtype=np.float16)


def test_churn_by_epoch_known_values():
    table = churn_by_epoch(PRED, LOSS, TARGET)
    assert tuple(table.columns) == CHURN_COLUMNS
    assert table["epoch"].tolist() == [1, 2]
    assert table["flip_rate"].tolist() == [0.5, 0.0]
    assert table["forgetting"].tolist() == [0.25, 0.0]
    assert table["learning"].tolist() == [0.25, 0.0]
    assert table["acc"].tolist() == [0.75, 0.75]
    assert table["d_acc"].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(table["val_loss"], [3.75 / 4, 4.75 / 4])
    np.testing.assert_allclose(table["d_val_loss"], [0.25 / 4, 1.0 / 4])
    # top 5% of 4 examples = 1 example, the highest loss of the epoch (example 2 both times):
    # epoch 1: |+1.5| / (|+1.5| + |-0.25 + 0 - 1.0|) = 6/11; epoch 2: all change is example 2
    np.testing.assert_allclose(table["top5_share_of_change"], [6 / 11, 1.0])
    # epoch 1: stable examples 0, 1 move -0.25, flipped 2, 3 move +0.5 -> 0.25 / 0.75
    np.testing.assert_allclose(table["stable_pred_share_of_change"], [1 / 3, 1.0])


def test_churn_summary_known_values():
    summary = churn_summary(PRED, LOSS, TARGET)
    assert summary["n_epochs"] == 3 and summary["n_examples"] == 4
    assert summary["flip_rate_mean"] == pytest.approx(0.25)
    assert summary["forgetting_events_per_example"] == pytest.approx(0.25)
    assert summary["learning_events_per_example"] == pytest.approx(0.25)
    assert summary["top5_share_of_change_mean"] == pytest.approx((6 / 11 + 1.0) / 2)
    assert summary["top5_share_of_change_pooled"] == pytest.approx(2.5 / 3.75)
    assert summary["stable_pred_share_of_change_mean"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert summary["stable_pred_share_of_change_pooled"] == pytest.approx(1.25 / 1.75)
    assert fluctuation_kind(summary) == "confidence"


def test_loss_moving_only_on_flipped_examples_is_predictions():
    pred = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    loss = np.array([[0.5, 0.5, 0.5, 0.5], [2.0, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]], dtype=np.float16)
    summary = churn_summary(pred, loss, np.zeros(4, dtype=int))
    assert summary["stable_pred_share_of_change_pooled"] == 0.0
    assert summary["forgetting_events_per_example"] == pytest.approx(0.25)
    assert fluctuation_kind(summary) == "predictions"


def test_identities_on_random_arrays():
    rng = np.random.default_rng(0)
    epochs, n = 12, 200
    target = rng.integers(0, 5, n)
    pred = np.where(rng.uniform(size=(epochs, n)) < 0.7, target, rng.integers(0, 5, (epochs, n)))
    loss = rng.gamma(2.0, 0.5, (epochs, n)).astype(np.float16)
    table = churn_by_epoch(pred, loss, target)
    np.testing.assert_allclose(table["d_acc"], table["learning"] - table["forgetting"], atol=1e-12)
    # a change of correctness needs a changed prediction
    assert np.all(table["flip_rate"] >= table["learning"] + table["forgetting"] - 1e-12)
    np.testing.assert_allclose(table["d_val_loss"], np.diff(loss.astype(np.float64).mean(axis=1)))
    for col in ("top5_share_of_change", "stable_pred_share_of_change"):
        assert table[col].between(0.0, 1.0).all()


def test_top5_takes_ceil_5_percent_and_breaks_ties_by_index():
    n = 30  # ceil(1.5) = 2 examples
    loss = np.full((2, n), 0.5, dtype=np.float16)
    loss[0, 1], loss[0, 2] = 0.25, 0.75  # so the tied examples 1 and 2 change by different amounts
    loss[1, :] = 1.0  # examples 1..29 tie at epoch 1; example 0 is the highest
    loss[1, 0] = 1.5
    pred = np.zeros((2, n), dtype=int)
    share = churn_by_epoch(pred, loss, np.zeros(n, dtype=int))["top5_share_of_change"].iloc[0]
    # top two = examples 0 and 1: changes 1.0 and 0.75; the rest 0.25 + 27 * 0.5
    assert share == pytest.approx(1.75 / (1.75 + 0.25 + 27 * 0.5))


def test_no_change_and_single_epoch_are_undetermined():
    pred = np.zeros((3, 4), dtype=int)
    loss = np.full((3, 4), 0.5, dtype=np.float16)
    table = churn_by_epoch(pred, loss, np.zeros(4, dtype=int))
    assert table["top5_share_of_change"].isna().all()
    assert fluctuation_kind(churn_summary(pred, loss, np.zeros(4, dtype=int))) == "undetermined"
    one = churn_summary(pred[:1], loss[:1], np.zeros(4, dtype=int))
    assert churn_by_epoch(pred[:1], loss[:1], np.zeros(4, dtype=int)).empty
    assert math.isnan(one["flip_rate_mean"]) and fluctuation_kind(one) == "undetermined"


def test_shape_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="shapes"):
        churn_by_epoch(PRED, LOSS[:, :3], TARGET)
    with pytest.raises(ConfigError, match="shapes"):
        churn_summary(PRED, LOSS, TARGET[:3])
