"""benchmarks/equivalence.py, the GPU check of the efficient SCConv against the reference, run here on the CPU."""

import pytest

from ablate.nn import efficient_cru


@pytest.fixture(scope="module")
def equivalence(benchmark_script):
    return benchmark_script("equivalence")


def test_passes_on_the_efficient_implementation(equivalence, capsys):
    assert equivalence.main(["--device", "cpu", "--orders", "cru,parallel", "--bf16"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.endswith("PASS")]
    # four float32 groups (NCHW and channels_last, kept and recomputed) and bf16; cru: 64 cases, parallel: 32
    assert len(rows) == 5 and all(" 96 " in row for row in rows)
    assert "FAIL" not in out
    # Each group really ran as named: float32 agrees to rounding, bf16 autocast only to bf16's 8 bits.
    output_error = {row[:38].strip(): float(row[38:].split()[1]) for row in rows}
    assert max(v for k, v in output_error.items() if k.startswith("float32")) < 1e-6
    assert 1e-4 < output_error["bf16 autocast NCHW recompute"] < 3e-2


def test_fails_when_the_efficient_implementation_computes_something_else(equivalence, monkeypatch, capsys):
    # A 1x1 conv off by 1e-4 relative: well inside what a loose check or a plot would pass.
    real = efficient_cru.pointwise
    monkeypatch.setattr(efficient_cru, "pointwise", lambda conv, x: real(conv, x) * (1 + 1e-4))
    assert equivalence.main(["--device", "cpu", "--orders", "cru"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_a_nan_never_passes(equivalence, monkeypatch, capsys):
    real = efficient_cru.pointwise
    monkeypatch.setattr(efficient_cru, "pointwise", lambda conv, x: real(conv, x) * float("nan"))
    assert equivalence.main(["--device", "cpu", "--orders", "cru"]) == 1
    assert "not finite" in capsys.readouterr().out


@pytest.mark.parametrize("argv, field", [(["--orders", "sru,diagonal"], "'diagonal'"),
                                         (["--device", "tpu"], "'tpu'")])
def test_bad_arguments_exit_2_naming_the_value(equivalence, capsys, argv, field):
    assert equivalence.main(argv) == 2
    err = capsys.readouterr().err
    assert field in err and "accepted" in err and len(err.strip().splitlines()) == 1
