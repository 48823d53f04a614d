"""`ablate bench`: a tiny real run (rows, keys, ratios), the summary arithmetic, the table and the errors."""

import json
import subprocess
import sys

import pytest

from ablate.bench import BenchConfig, BenchError, _run_worker, format_table, summarise
from ablate.cli import main
from ablate.config import ConfigError

ROW_KEYS = {"impl", "backbone", "batch_size", "image_size", "device", "step_seconds", "peak_memory_mb",
            "time_ratio", "memory_ratio", "macs_ratio", "compiled", "compile_seconds", "saved_mb", "saved_ratio", "ops",
            "ops_ratio"}


@pytest.fixture(scope="module")
def bench_run():
    """One round of 2 timed steps of resnet20 at batch 2, 32x32, through the real command line."""
    cmd = [sys.executable, "-m", "ablate.cli", "bench", "--backbone", "resnet20", "--batch-size", "2",
           "--image-size", "32", "--steps", "2", "--warmup", "1", "--repeats", "1", "--device", "cpu",
           "--threads", "1", "--format", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    return rows, proc.stderr


@pytest.fixture(scope="module")
def bench_rows(bench_run):
    return bench_run[0]


def test_progress_names_each_run_on_stderr(bench_run):
    lines = bench_run[1].splitlines()
    assert [line for line in lines if line.startswith("bench: ")] == [
        f"bench: resnet20 {impl}, round 1 of 1" for impl in ("baseline", "reference", "efficient")]


def test_rows_cover_every_impl_with_baseline_first(bench_rows):
    assert [row["impl"] for row in bench_rows] == ["baseline", "reference", "efficient"]
    for row in bench_rows:
        assert ROW_KEYS <= row.keys()
        assert (row["backbone"], row["batch_size"], row["image_size"], row["device"]) == ("resnet20", 2, 32, "cpu")
        assert row["step_seconds"] > 0 and row["peak_memory_mb"] > 0 and row["saved_mb"] > 0
        assert (row["steps"], row["repeats"], row["threads"]) == (2, 1, 1)
        assert row["compiled"] is False and row["compile_seconds"] is None
    planned = {row["impl"]: (row["recompute"], row["recomputed"]) for row in bench_rows}
    assert planned["baseline"] == planned["reference"] == (None, None)
    assert planned["efficient"][0] == "auto" and planned["efficient"][1].endswith("/9")  # resnet20's 9 SCConvs


def test_macs_ratio_is_the_profiled_ratio(bench_rows):
    from ablate.config import ModelConfig, SCConvConfig
    from ablate.profile import profile_rows

    base, scconv = profile_rows(ModelConfig("resnet20", num_classes=1000, scconv=SCConvConfig(order="sru_cru")), 32,
                                compare=True)
    by_impl = {row["impl"]: row for row in bench_rows}
    assert by_impl["baseline"]["macs_ratio"] == 1.0
    for impl in ("reference", "efficient"):
        assert by_impl[impl]["macs_ratio"] == pytest.approx(scconv["macs"] / base["macs"])
        assert by_impl[impl]["macs_ratio"] < 1.0


def test_ops_count_each_step_and_an_scconv_step_dispatches_more(bench_rows):
    # The GPU-relevant cost: each SCConv runs dozens of operations where its conv ran three.
    by_impl = {row["impl"]: row for row in bench_rows}
    assert by_impl["baseline"]["ops"] > 0 and by_impl["baseline"]["ops_ratio"] == 1.0
    for impl in ("reference", "efficient"):
        assert by_impl[impl]["ops_ratio"] == pytest.approx(by_impl[impl]["ops"] / by_impl["baseline"]["ops"])
        assert by_impl[impl]["ops_ratio"] > 2


def test_ratios_are_against_the_baseline(bench_rows):
    base = bench_rows[0]
    assert base["time_ratio"] == 1.0 and base["memory_ratio"] == 1.0
    for row in bench_rows:
        assert row["time_ratio"] == pytest.approx(row["step_seconds"] / base["step_seconds"])
        assert row["memory_ratio"] == pytest.approx(row["peak_memory_mb"] / base["peak_memory_mb"])
        assert row["saved_ratio"] == pytest.approx(row["saved_mb"] / base["saved_mb"])


def test_summary_pools_step_times_and_takes_the_largest_peak():
    cfg = BenchConfig(backbone="resnet20", device="cpu", impls=("baseline", "efficient"), compile=True).resolved()
    common = {"threads": 2, "warmup_times": [50.0, 3.0]}
    rounds = {
        ("baseline", None): [{"step_times": [1.0, 3.0], "peak_memory_mb": 100.0, "saved_mb": 40.0, "macs": 200, **common},
                     {"step_times": [2.0, 9.0], "peak_memory_mb": 120.0, "saved_mb": 40.0, "macs": 200, **common}],
        ("efficient", "auto"): [{"step_times": [1.0, 1.5], "peak_memory_mb": 90.0, "saved_mb": 30.0, "macs": 130,
                       "recomputed": "5/9", **common},
                      {"step_times": [0.5, 1.0], "peak_memory_mb": 60.0, "saved_mb": 30.0, "macs": 130,
                       "recomputed": "3/9", **common}],
    }
    base, eff = summarise(cfg, rounds)
    assert (base["step_seconds"], base["peak_memory_mb"]) == (2.5, 120.0)  # median of 1, 2, 3, 9
    assert (eff["step_seconds"], eff["peak_memory_mb"]) == (1.0, 90.0)
    assert eff["time_ratio"] == pytest.approx(0.4) and eff["memory_ratio"] == pytest.approx(0.75)
    assert eff["macs_ratio"] == pytest.approx(0.65) and eff["compiled"] is True
    assert (eff["saved_mb"], eff["saved_ratio"]) == (30.0, pytest.approx(0.75))
    assert (eff["recompute"], eff["recomputed"]) == ("auto", "5/9,3/9")  # each round plans its own
    assert (base["recompute"], base["recomputed"]) == (None, None)
    assert eff["ops"] is None and eff["ops_ratio"] is None  # compiled: kernels bypass the dispatcher
    # Warm-up beyond two steady steps per round: 53 - 2 * 2 and 53 - 2 * 5.5 for the baseline, median 45.5.
    assert base["compile_seconds"] == pytest.approx(45.5)
    assert eff["compile_seconds"] == pytest.approx((53 - 2 * 1.25 + 53 - 2 * 0.75) / 2)


def test_several_recompute_policies_give_one_efficient_row_each_in_the_same_rounds(tmp_path):
    cmd = [sys.executable, "-m", "ablate.cli", "bench", "--backbone", "resnet20", "--batch-size", "4",
           "--image-size", "32", "--steps", "1", "--warmup", "1", "--repeats", "1", "--device", "cpu",
           "--threads", "1", "--impls", "baseline,efficient", "--recompute", "never,always", "--format", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(row["impl"], row["recompute"]) for row in rows] == [
        ("baseline", None), ("efficient", "never"), ("efficient", "always")]
    assert "bench: resnet20 efficient (recompute always), round 1 of 1" in proc.stderr
    never, always = rows[1], rows[2]
    assert always["saved_mb"] < never["saved_mb"]  # recomputing keeps only each SCConv's input
    assert never["recomputed"] is None and always["recomputed"] is None  # fixed policies plan nothing


def test_compile_is_accepted_on_the_cpu():
    cfg = BenchConfig(backbone="resnet20", device="cpu", compile=True).resolved()
    assert cfg.compile and cfg.device == "cpu"


def test_table_has_one_line_per_row(bench_rows):
    lines = format_table(bench_rows).splitlines()
    assert lines[0].split()[:2] == ["impl", "backbone"] and "memory" in lines[0] and "MACs x" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["baseline", "reference", "efficient"]


@pytest.mark.parametrize("argv, named", [
    (["--device", "gpu"], "device='gpu'"),
    (["--impls", "efficient"], "impls='efficient'"),
    (["--format", "csv"], "format='csv'"),
    (["--steps", "0"], "steps=0"),
    (["--image-size", "16"], "image_size=16"),
    (["--amp", "--device", "cpu"], "amp=True"),
    (["--compile", "--warmup", "0", "--device", "cpu"], "warmup=0"),
    (["--recompute", "sometimes"], "recompute='sometimes'"),
    (["--recompute", "auto,auto"], "recompute='auto,auto'"),
])
def test_bad_values_fail_in_one_line_with_status_2(argv, named, capsys):
    assert main(["bench", "--backbone", "resnet20", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err


def test_unknown_backbone_fails_before_any_run(capsys):
    assert main(["bench", "--backbone", "resnet21", "--device", "cpu"]) == 2
    assert "did you mean 'resnet20'" in capsys.readouterr().err


def test_a_failing_run_is_one_line_error():
    # Bypasses the parent's checks, so the worker itself fails.
    with pytest.raises(BenchError, match=r"the baseline run of nonet failed \(exit 1\): .*backbone='nonet'"):
        _run_worker(BenchConfig(backbone="nonet", device="cpu"), "baseline")


def test_config_rejects_impls_without_baseline():
    with pytest.raises(ConfigError, match="impls='reference,efficient'"):
        BenchConfig(impls=("reference", "efficient"))
