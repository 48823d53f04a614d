"""Training with ``compile = true`` on the CPU: the same training as eager, the compile time logged apart."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from ablate.config import ModelConfig, RunConfig, SCConvConfig
from ablate.models import build_model
from ablate.names import COMPILE_SECONDS_METRIC
from ablate.train import run_training
from ablate.train.runner import COMPILED_CUDA_WARNING, compiled_needs_check

FAST = {"dataset": "digits", "backbone": "resnet20", "image_size": 16, "batch_size": 32, "max_steps_per_epoch": 2,
        "probe_size": 16, "experiment": "t", "scconv.order": "sru_cru", "epochs": 2, "log_checkpoint": False}


def _train(tracking_uri, **kw):
    return run_training(RunConfig.from_dict({**FAST, **kw}), tracking_uri=tracking_uri, progress=False)


def _compiled_with(monkeypatch, backend: str) -> list:
    """Route the runner's torch.compile to ``backend``; returns the modules it compiled."""
    compiled, real = [], torch.compile

    def compile_(model, **kw):
        compiled.append(model)
        return real(model, backend=backend, **kw)

    monkeypatch.setattr(torch, "compile", compile_)
    return compiled


def test_compiled_training_matches_eager_and_logs_its_compile_time(tracking_uri, monkeypatch, capsys):
    eager = _train(tracking_uri)
    # aot_eager traces forward and backward as inductor does, without generating code: seconds, not minutes.
    compiled = _compiled_with(monkeypatch, "aot_eager")
    result = _train(tracking_uri, compile="true")
    assert len(compiled) == 1 and result.status == "FINISHED"
    for key in ("train_loss", "val_loss", "val_acc"):
        assert [row[key] for row in result.history] == pytest.approx([row[key] for row in eager.history], rel=1e-4)
    points = MlflowClient(tracking_uri).get_metric_history(result.run_id, COMPILE_SECONDS_METRIC)
    assert [p.step for p in points] == [0] and points[0].value > 0
    err = capsys.readouterr().err
    assert "ablate: compiling the model" in err and "ablate: compiled; the first step took" in err
    assert COMPILED_CUDA_WARNING not in err  # CPU compilation passes the equivalence checks


def test_compiling_efficient_scconvs_on_cuda_warns_until_checked_there():
    # benchmarks/equivalence.py found a wrong input gradient under inductor on an H200 (benchmarks/README.md).
    efficient = build_model(ModelConfig(backbone="resnet20", scconv=SCConvConfig(impl="efficient")), seed=0)
    reference = build_model(ModelConfig(backbone="resnet20", scconv=SCConvConfig(impl="reference")), seed=0)
    assert compiled_needs_check(efficient, torch.device("cuda"))
    assert not compiled_needs_check(efficient, torch.device("cpu"))
    assert not compiled_needs_check(reference, torch.device("cuda"))


@pytest.mark.slow
def test_inductor_trains_on_the_cpu(tracking_uri):
    result = _train(tracking_uri, compile="true", epochs=1)
    assert result.status == "FINISHED" and result.history[0]["train_loss"] > 0
