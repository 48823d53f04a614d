"""Training with ``compile = true`` on the CPU: the same training as eager, the compile time logged apart."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from ablate.config import ModelConfig, RunConfig, SCConvConfig
from ablate.models import build_model
from ablate.nn import SCConv
from ablate.names import COMPILE_CHECK_TAG, COMPILE_SECONDS_METRIC
from ablate.nn import compile_check
from ablate.train import run_training
from ablate.train import runner
from ablate.train.runner import compiled_needs_check

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
    assert "compiled SCConv check" not in err  # checked on CUDA only
    assert COMPILE_CHECK_TAG not in MlflowClient(tracking_uri).get_run(result.run_id).data.tags


def test_compiled_efficient_scconvs_are_checked_on_cuda_only():
    # benchmarks/equivalence.py found a wrong input gradient under inductor on an H200 (benchmarks/README.md).
    efficient = build_model(ModelConfig(backbone="resnet20", scconv=SCConvConfig(impl="efficient")), seed=0)
    reference = build_model(ModelConfig(backbone="resnet20", scconv=SCConvConfig(impl="reference")), seed=0)
    assert compiled_needs_check(efficient, torch.device("cuda"))
    assert not compiled_needs_check(efficient, torch.device("cpu"))
    assert not compiled_needs_check(reference, torch.device("cuda"))


class _ZeroInputGrad(nn.Module):
    """A "compiled" module whose input gradient is zero, its output and parameter gradients right: what inductor
    gave one efficient SCConv on an H200."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.requires_grad:
            x.register_hook(torch.zeros_like)
        return self.inner(x)


def _model(**scconv):
    return build_model(ModelConfig(backbone="resnet20", scconv=SCConvConfig(impl="efficient", **scconv)), seed=0)


def test_compile_check_passes_a_faithful_compiler_and_names_what_a_wrong_one_breaks():
    model = _model()
    cpu = torch.device("cpu")
    faithful = compile_check.check_compiled_scconvs(model, cpu, False, lambda m: torch.compile(m, backend="aot_eager"))
    assert len(faithful) == 2 and all(r.passed for r in faithful)
    assert [r.name.endswith("kept") for r in faithful] == [True, False]  # kept, then recomputed
    wrong = compile_check.check_compiled_scconvs(model, cpu, True, _ZeroInputGrad)
    assert not any(r.passed for r in wrong)
    assert all(r.worst == ("input gradient", pytest.approx(1.0)) for r in wrong)
    assert "input gradient off by 1.0e+00" in wrong[0].describe()
    nan = compile_check.check_case(model.layer1[0].conv2, False, cpu, False, lambda m: (lambda x: m(x) * float("nan")))
    assert not nan.passed  # a NaN is no pass


def test_compile_check_takes_one_layer_of_each_kind():
    model = _model()
    kinds = {(m.config, m.in_channels == m.out_channels) for m in model.modules() if isinstance(m, SCConv)}
    assert len(compile_check.cases(model)) == 2 * len(kinds)
    assert [r for _, _, r in compile_check.cases(_model(recompute="never"))] == [False] * len(kinds)  # never recomputes
    assert [r for _, _, r in compile_check.cases(_model(order="sru"))] == [False] * len(kinds)  # the conv keeps
    reference = build_model(ModelConfig(backbone="resnet20", scconv=SCConvConfig(impl="reference")), seed=0)
    assert compile_check.cases(reference) == []
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compile_check.check_compiled_scconvs(model, torch.device("cpu"), False, lambda m: m)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as it was
    assert all(m.planned_recompute is None for m in model.modules() if isinstance(m, SCConv))


def _raise(*args, **kwargs):
    raise RuntimeError("no compiler here\nsecond line")


@pytest.mark.parametrize("case", ["faithful", "wrong", "raises"])
def test_compiled_training_where_the_check_fails_trains_eager_and_says_so(tracking_uri, monkeypatch, capsys, case):
    monkeypatch.setattr(runner, "compiled_needs_check", lambda model, device: True)  # as on CUDA
    faithful = case == "faithful"
    if faithful:
        _compiled_with(monkeypatch, "aot_eager")
    else:
        monkeypatch.setattr(torch, "compile", lambda model, **kw: _ZeroInputGrad(model))
    if case == "raises":
        monkeypatch.setattr(compile_check, "check_compiled_scconvs", _raise)
    result = _train(tracking_uri, compile="true")
    assert result.status == "FINISHED"
    err = capsys.readouterr().err
    tag = MlflowClient(tracking_uri).get_run(result.run_id).data.tags[COMPILE_CHECK_TAG]
    if faithful:
        assert tag.startswith("passed: 2 cases") and "compiled SCConv check passed" in err
        assert "ablate: compiling the model" in err
    else:
        want = "input gradient off by" if case == "wrong" else "raised RuntimeError: no compiler here;"
        assert tag.startswith("failed: ") and want in tag and tag.endswith("trained eager")
        warning = [line for line in err.splitlines() if "failed its check on this device" in line]
        assert len(warning) == 1 and "scconv.impl=reference" in warning[0]
        assert "ablate: compiling the model" not in err  # the steps ran eager
        assert not MlflowClient(tracking_uri).get_metric_history(result.run_id, COMPILE_SECONDS_METRIC)


@pytest.mark.slow
def test_inductor_trains_on_the_cpu(tracking_uri):
    result = _train(tracking_uri, compile="true", epochs=1)
    assert result.status == "FINISHED" and result.history[0]["train_loss"] > 0


def test_compile_check_command_prints_each_case_and_fails_on_bad_input(capsys):
    assert compile_check.main(["--backbone", "resnet20", "--device", "cpu", "--backend", "aot_eager"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:2]] == ["PASS", "PASS"] and out[-1] == "2 of 2 cases within 0.01"
    for argv, needle in ((["--backbone", "vgg"], "--backbone 'vgg'"), (["--backend", "xyz"], "--backend 'xyz'"),
                         (["--order", "none", "--backbone", "resnet20"], "--order 'none'"),
                         (["--order", "bad", "--backbone", "resnet20"], "scconv.order='bad'")):
        assert compile_check.main(argv + ["--device", "cpu"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and needle in captured.err


@pytest.mark.slow
def test_inductor_passes_the_compile_check_on_the_cpu(capsys):
    # what a compiled CUDA run checks, with the real compiler on this CPU (benchmarks/README.md: all cases pass here)
    assert compile_check.main(["--backbone", "resnet20", "--device", "cpu", "--nchw"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 of 2 cases within 0.01"
