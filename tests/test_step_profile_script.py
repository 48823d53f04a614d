"""benchmarks/step_profile.py: where a training step's time goes, baseline and SCConv side by side."""

import pytest


@pytest.fixture(scope="module")
def step_profile(benchmark_script):
    return benchmark_script("step_profile")


def test_summary_splits_convolution_work_from_the_rest(step_profile):
    profiles = {"baseline": {"aten::convolution_backward": 6.0, "aten::mkldnn_convolution": 3.0, "aten::add_": 1.0},
                "efficient": {"aten::convolution_backward": 3.0, "aten::bmm": 1.5, "aten::native_group_norm": 2.0}}
    rows = {row[0]: row[1:] for row in step_profile.summary_rows(profiles, top=2)}
    assert list(rows)[:2] == ["aten::convolution_backward", "aten::mkldnn_convolution"]  # by largest cost
    assert rows["convolution work (convs, backward, bmm)"] == ["9.0", "4.5"]
    assert rows["everything else"] == ["1.0", "2.0"]
    assert rows["total self CPU"] == ["10.0", "6.5"]


def test_profiles_a_real_step_of_each_implementation(step_profile, capsys):
    assert step_profile.main(["--backbone", "resnet20", "--image-size", "32", "--batch-size", "2",
                              "--warmup", "1", "--steps", "1", "--top", "5"]) == 0
    out = capsys.readouterr().out
    header, rule, *rows = out.splitlines()[1:]
    assert header.split() == ["operation", "baseline", "efficient"]
    cells = {row.rsplit(None, 2)[0].strip(): [float(v) for v in row.split()[-2:]] for row in rows}
    conv, rest, total = (cells[k] for k in ("convolution work (convs, backward, bmm)", "everything else",
                                            "total self CPU"))
    assert all(c > 0 for c in conv)
    assert total == pytest.approx([c + r for c, r in zip(conv, rest)], abs=0.15)


@pytest.mark.parametrize("argv, field", [(["--backbone", "resnet21"], "backbone='resnet21'"),
                                         (["--impls", "baseline,fast"], "impls='fast'"),
                                         (["--impls", ","], "impls=','"),
                                         (["--recompute", "sometimes"], "recompute='sometimes'"),
                                         (["--compile", "--warmup", "0"], "warmup=0"),
                                         (["--top", "0"], "top=0")])
def test_bad_input_is_one_line_and_exit_2(step_profile, capsys, argv, field):
    assert step_profile.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and "accepted" in err[0]
