"""analysis.attribution and `analysis sensitivity`: captum sensitivity of gate masks and GradCAM on checkpoints."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_runs import log_run

from ablate.config import RunConfig

ORDERS = ("none", "sru_cru")


def _config(order: str) -> RunConfig:
    return RunConfig.from_dict({"scconv.order": order, "image_size": 16, "epochs": 2, "experiment": "sens",
                                "seed": 0}).resolved()


@pytest.fixture(scope="module")
def models():
    from ablate.models import build_model

    return {order: build_model(_config(order).model, seed=0).eval() for order in ORDERS}


def _check(row: dict, gated: bool) -> None:
    assert math.isfinite(row["attribution_sensitivity"]) and row["attribution_sensitivity"] >= 0
    if gated:
        assert math.isfinite(row["mask_sensitivity"]) and 0.0 <= row["flip_share"] <= 1.0
        per_layer = [v for k, v in row.items() if k.startswith("flip_share.")]
        assert len(per_layer) == 9 and all(0.0 <= v <= 1.0 for v in per_layer)
    else:
        assert math.isnan(row["mask_sensitivity"]) and math.isnan(row["flip_share"])


def test_compare_models_same_layer_finite(models):
    from analysis.attribution import compare_models, probe_images

    images, labels = probe_images(_config("none"), 4)
    results = compare_models(models, images, labels, n_perturb=2)
    assert [r.label for r in results] == list(ORDERS)
    assert {r.layer for r in results} == {"layer3.2.conv2"}  # the last SCConv; the conv it replaced in the baseline
    _check(results[0].row(), gated=False)
    _check(results[1].row(), gated=True)


def test_flip_share_grows_with_the_radius(models):
    from analysis.attribution import flip_counts

    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    small = flip_counts(models["sru_cru"], images, radius=1e-6, n_perturb=2, seed=0)
    large = flip_counts(models["sru_cru"], images, radius=1.0, n_perturb=2, seed=0)
    assert sum(f for f, _ in small.values()) <= sum(f for f, _ in large.values())
    assert sum(f for f, _ in large.values()) > 0
    assert flip_counts(models["none"], images, 0.1, 2, 0) == {}


def _log_checkpoint_runs(uri: str, models, with_checkpoint: bool = True) -> dict[str, str]:
    """One tracked run per order, with loss histories and (optionally) checkpoint/checkpoint.pt."""
    from mlflow import MlflowClient

    from ablate.train.checkpoint import save_checkpoint

    client = MlflowClient(uri)
    root = Path(os.environ["SCCONV_ARTIFACT_ROOT"])
    exp = client.create_experiment("sens", artifact_location=(root / "sens").as_uri())
    ids = {}
    for order, model in models.items():
        cfg = _config(order)
        run_id = log_run(client, exp, cfg.to_params(), {"train_loss": np.array([1.0, 0.8]),
                                                        "val_loss": np.array([1.1, 0.9])}, run_name=order)
        if with_checkpoint:
            path = root.parent / f"ckpt-{order}" / "checkpoint.pt"
            save_checkpoint(path, {"config": cfg.to_dict(), "model": model.state_dict(), "epoch": 1})
            client.log_artifact(run_id, str(path), "checkpoint")
        ids[order] = run_id
    return ids


def test_cli_sensitivity_against_baseline(store, models, capsys):
    from analysis.cli import main

    ids = _log_checkpoint_runs(store, models)
    rc = main(["sensitivity", "--run-id", ids["sru_cru"], "--baseline-run-id", ids["none"], "--tracking-uri", store,
               "--images", "4", "--perturbations", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "attribution_ratio" in out and ids["sru_cru"] in out and "layer3.2.conv2" in out


def test_report_with_sensitivity(store, models):
    from analysis.report import build_report_data, sensitivity_findings
    from analysis.runs import make_client

    _log_checkpoint_runs(store, models)
    data = build_report_data(make_client(store), "sens", sensitivity=True)
    table = data.sensitivity.set_index("label")
    assert list(table.index) == ["none", "sru_cru"]
    _check(table.loc["sru_cru"].to_dict(), gated=True)
    assert any("GradCAM sensitivity" in line for line in sensitivity_findings(data))


def test_missing_checkpoint_is_a_one_line_error(store, models, capsys):
    from analysis.cli import main

    ids = _log_checkpoint_runs(store, models, with_checkpoint=False)
    assert main(["sensitivity", "--run-id", ids["sru_cru"], "--tracking-uri", store]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no checkpoint/checkpoint.pt artifact" in err[0]
    assert main(["sensitivity", "--run-id", "0" * 32, "--tracking-uri", store]) == 2
    assert "is not a run" in capsys.readouterr().err
