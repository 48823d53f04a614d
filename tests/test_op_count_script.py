"""benchmarks/op_count.py: the operations per SCConv step that set its time on a GPU, counted on the CPU."""

import pytest

from ablate.nn import efficient_sru


@pytest.fixture(scope="module")
def op_count(benchmark_script):
    return benchmark_script("op_count")


def test_efficient_layer_dispatches_at_most_a_fifth_more_than_the_reference_on_the_gpu_path(op_count):
    # On an H200 the eager step time tracked the operation count (benchmarks/README.md): before the grouped
    # GroupNorm statistics and the GroupNorm backward kernel, the GPU path dispatched 1.59-1.93x the reference's,
    # 1.21-1.25x before the backward rebuilt z from the forward's coefficients, 1.09-1.14x since.
    rows = [row for row in op_count.layer_rows() if row[1] == "gpu"]
    assert len(rows) == len(op_count.GATES)
    for row in rows:
        reference, keep = int(row[2]), int(row[3].split()[0])
        assert keep <= 1.2 * reference, row


def test_code_path_switches_the_efficient_branches_and_restores_them(op_count):
    before = (efficient_sru.GROUP_NORM_ANY_LAYOUT_DEVICES, efficient_sru.GROUP_NORM_BACKWARD_KERNEL_DEVICES)
    with op_count.code_path("gpu"):
        assert "cpu" not in efficient_sru.GROUP_NORM_ANY_LAYOUT_DEVICES
        assert "cpu" in efficient_sru.GROUP_NORM_BACKWARD_KERNEL_DEVICES
    assert (efficient_sru.GROUP_NORM_ANY_LAYOUT_DEVICES, efficient_sru.GROUP_NORM_BACKWARD_KERNEL_DEVICES) == before


def test_prints_both_tables_and_refuses_an_unknown_backbone(op_count, capsys):
    assert op_count.main(["--models", "resnet20"]) == 0
    out = capsys.readouterr().out
    assert "per forward + backward of one SCConv" in out and "per training step" in out
    assert out.count("resnet20") == 2  # the CPU and the GPU path
    assert op_count.main(["--models", "resnet21"]) == 2
    err = capsys.readouterr().err
    assert "'resnet21'" in err and "accepted" in err
