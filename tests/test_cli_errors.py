"""Bad input, unreachable or unwritable stores, races on fresh stores, Ctrl-C and `ablate ui`: each fails fast
with one line (exit 2 for user errors) and leaves nothing behind; a sampled study runs exactly n_trials."""

import dataclasses
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import typing
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from ablate import track
from ablate.cli import main
from ablate.config import DataConfig, ModelConfig, RunConfig, SCConvConfig, TrainConfig
from ablate.errors import ConfigError
from ablate.names import FAILURE_ATTR, OPTUNA_STATE_TAG, SLOT_ATTR, SURPLUS_ATTR

TINY_BASE = 'dataset = "digits"\nbackbone = "resnet20"\nmax_steps_per_epoch = 2\nimage_size = 16\nbatch_size = 32\n'


def write_space(tmp_path: Path, name: str, study: str, base: str, params: str) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"[study]\n{study}\n[base]\n{TINY_BASE}{base}\n[params]\n{params}\n")
    return str(path)


def one_line_error(capsys, rc: int, expected_rc: int = 2) -> str:
    """The single stderr line of a command that failed with ``expected_rc`` and printed nothing on stdout."""
    captured = capsys.readouterr()
    assert rc == expected_rc, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert captured.out == ""
    return lines[0]


@pytest.fixture
def bare(tmp_path, monkeypatch):
    """A temp folder as the working directory with no tracking store set: any default store would land here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


# -- values ------------------------------------------------------------------------------------------------


def _float_keys() -> list[str]:
    """Every config key typed float, as --set names it."""
    keys = []
    for prefix, section in (("scconv.", SCConvConfig), ("", ModelConfig), ("", DataConfig), ("", TrainConfig),
                            ("", RunConfig)):
        hints = typing.get_type_hints(section)
        keys += [prefix + f.name for f in dataclasses.fields(section)
                 if float in (typing.get_args(hints[f.name]) or (hints[f.name],))]
    return keys


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", float("inf"), float("nan")])
def test_every_float_field_refuses_non_finite_values(value):
    keys = _float_keys()
    assert {"lr", "momentum", "weight_decay", "lr_decay", "scconv.alpha", "scconv.gate_threshold"} <= set(keys)
    for key in keys:
        with pytest.raises(ConfigError, match=rf"^{key}="):
            RunConfig.from_dict({key: value})


@pytest.mark.parametrize("assignment, words", [
    ("lr=inf", ["lr=inf", "finite"]),
    ("momentum=inf", ["momentum=inf"]),
    ("weight_decay=nan", ["weight_decay=nan"]),
    ("lr=1/0", ["lr='1/0'", "a number"]),
    ("scconv.alpha=1/0", ["scconv.alpha='1/0'"]),
])
def test_train_refuses_bad_numbers_in_one_line_and_writes_nothing(bare, capsys, assignment, words):
    line = one_line_error(capsys, main(["train", "--set", assignment, "--quiet"]))
    for word in words:
        assert word in line
    assert list(bare.iterdir()) == []


def test_fractions_still_parse():
    assert RunConfig.from_dict({"scconv.alpha": "3/8"}).model.scconv.alpha == 0.375


def test_a_layer_rule_names_the_key_the_user_set_not_the_default(bare, capsys):
    line = one_line_error(capsys, main(["profile", "--backbone", "resnet20", "--num-classes", "10",
                                        "--image-size", "32", "--squeeze-ratio", "3"]))
    assert "scconv.squeeze_ratio=3 (set by you)" in line
    assert "default scconv.group_size=2" in line and "set scconv.group_size too" in line
    # A key the user set is named as it is.
    line = one_line_error(capsys, main(["profile", "--backbone", "resnet20", "--num-classes", "10",
                                        "--image-size", "32", "--squeeze-ratio", "3", "--group-size", "2"]))
    assert "scconv.group_size=2 is not valid" in line and "set by you" not in line


# -- stores: unreachable, unwritable, missing ----------------------------------------------------------------


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers (a hung or firewalled server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def test_an_unanswering_tracking_server_is_one_line_within_seconds(bare, capsys, silent_server, monkeypatch):
    for key in track.HTTP_LIMITS:
        monkeypatch.delenv(key, raising=False)
    uri = f"http://user:secret@127.0.0.1:{silent_server}"
    start = time.monotonic()
    rc = main(["train", "--tracking-uri", uri, "--set", "epochs=1", "--quiet"])
    took = time.monotonic() - start
    line = one_line_error(capsys, rc)
    assert took < track.CONNECT_TIMEOUT_S + 10
    assert f"127.0.0.1:{silent_server}" in line and "not reachable" in line and "mlflow server" in line
    assert "secret" not in line and "user:***@" in line
    assert list(bare.iterdir()) == []


def test_mlflow_http_limits_are_bounded_for_the_run(monkeypatch, silent_server):
    for key in track.HTTP_LIMITS:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError):
        track.client(f"http://127.0.0.1:{silent_server}")
    assert all(os.environ[key] == value for key, value in track.HTTP_LIMITS.items())


def test_an_unreachable_database_storage_is_one_line(bare, capsys):
    pytest.importorskip("psycopg2")
    rc = main(["study", "--space", "sru_cru_order", "--storage", "postgresql://u:secret@127.0.0.1:1/db",
               "--tracking-uri", f"sqlite:///{bare / 'm' / 'mlflow.db'}", "--quiet"])
    line = one_line_error(capsys, rc)
    assert line.startswith("ablate: error: storage='postgresql://u:***@127.0.0.1:1/db' is not reachable")
    assert "secret" not in line
    assert list(bare.iterdir()) == []
    assert "connect_timeout=" in track.database_url("postgresql://u@h/db")


@pytest.mark.parametrize("command, option", [("train", "--tracking-uri"), ("study", "--tracking-uri"),
                                             ("study", "--storage")])
def test_unwritable_stores_are_one_line_and_nothing_is_written(bare, capsys, command, option):
    blocker = bare / "file"
    blocker.write_text("not a folder")
    (bare / "folder.db").mkdir()
    for bad in (f"sqlite:///{blocker}/sub/x.db", f"sqlite:///{bare / 'folder.db'}"):
        stores = {"--tracking-uri": f"sqlite:///{bare / 'ok' / 'mlflow.db'}",
                  "--storage": f"sqlite:///{bare / 'ok' / 'optuna.db'}", option: bad}
        args = ["study", "--space", "sru_cru_order"] if command == "study" else ["train"]
        if command == "train":
            stores.pop("--storage")
        rc = main([*args, *[x for kv in stores.items() for x in kv], "--quiet"])
        line = one_line_error(capsys, rc)
        assert "is not writable" in line and option.lstrip("-").replace("-", "_") in line
        assert sorted(p.name for p in bare.iterdir()) == ["file", "folder.db"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_unwritable(bare, capsys):
    ro = bare / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    line = one_line_error(capsys, main(["train", "--tracking-uri", f"sqlite:///{ro}/mlflow.db", "--quiet"]))
    assert "is not writable" in line and list(ro.iterdir()) == []


def test_a_failed_resume_creates_no_store(bare, capsys):
    line = one_line_error(capsys, main(["train", "--resume", "abc", "--tracking-uri",
                                        f"sqlite:///{bare / 'm' / 'mlflow.db'}", "--quiet"]))
    assert "resume='abc'" in line and "does not exist" in line
    assert list(bare.iterdir()) == []


_FIRST_USE = textwrap.dedent("""
    import sys
    from types import SimpleNamespace
    from ablate import track
    from ablate.study.storage import make_storage
    track.client(sys.argv[1]).search_experiments()
    make_storage(SimpleNamespace(storage_url=sys.argv[2], tracking_uri=sys.argv[1], heartbeat_interval=10,
                                 grace_period=30))
""")


def test_processes_starting_together_on_fresh_sqlite_stores_all_succeed(tmp_path):
    # Without the lock around table creation one of them dies (table already exists, alembic CommandError).
    uri, storage = f"sqlite:///{tmp_path / 's' / 'mlflow.db'}", f"sqlite:///{tmp_path / 's' / 'optuna.db'}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs = [subprocess.Popen([sys.executable, "-c", _FIRST_USE, uri, storage], stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert {e.experiment_id for e in MlflowClient(uri).search_experiments()} == {"0"}


# -- studies --------------------------------------------------------------------------------------------------


def test_a_set_that_breaks_a_grid_cell_stops_before_anything_is_created(bare, capsys):
    space = write_space(bare, "broken", 'sampler = "grid"\npruner = "none"', "epochs = 1",
                        '"scconv.order" = ["none", "cru"]')
    stores = ["--storage", f"sqlite:///{bare / 'st' / 'optuna.db'}", "--tracking-uri",
              f"sqlite:///{bare / 'st' / 'mlflow.db'}"]
    line = one_line_error(capsys, main(["study", "--space", space, "--set", "scconv.group_size=3", *stores,
                                        "--quiet"]))
    assert "--set scconv.group_size=3 makes cell {'scconv.order': 'cru'}" in line
    assert sorted(p.name for p in bare.iterdir()) == ["broken.toml"]


def test_a_space_with_no_buildable_cell_stops_before_anything_is_created(bare, capsys):
    space = write_space(bare, "none_build", 'sampler = "grid"\npruner = "none"',
                        'epochs = 1\n"scconv.order" = "cru"', '"scconv.squeeze_ratio" = [16, 32]')
    stores = ["--storage", f"sqlite:///{bare / 'st' / 'optuna.db'}", "--tracking-uri",
              f"sqlite:///{bare / 'st' / 'mlflow.db'}"]
    line = one_line_error(capsys, main(["study", "--space", space, *stores, "--quiet"]))
    assert "has no cell that can be built" in line and "scconv.squeeze_ratio=16" in line
    assert sorted(p.name for p in bare.iterdir()) == ["none_build.toml"]


def test_a_study_whose_every_trial_failed_exits_1_with_a_summary(tmp_path, tracking_uri, storage_url, capsys):
    space = write_space(tmp_path, "diverge_all", 'sampler = "grid"\npruner = "none"',
                        'epochs = 1\n"scconv.order" = "none"', "lr = [1e30]")
    rc = main(["study", "--space", space, "--storage", storage_url, "--tracking-uri", tracking_uri, "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "study diverge_all: all 1 finished trials failed (nonfinite_loss x1)" in err


@pytest.mark.slow  # two spawned workers: a minute on a busy 2-core machine; the next test covers the mechanism
def test_sampled_study_with_two_workers_runs_exactly_n_trials(tmp_path, tracking_uri, storage_url):
    space = write_space(tmp_path, "exact", 'sampler = "random"\npruner = "none"\nn_trials = 3',
                        'epochs = 1\n"scconv.order" = "none"', "lr = {low = 0.01, high = 0.1, log = true}")
    assert main(["study", "--space", space, "--workers", "2", "--heartbeat", "1", "--storage", storage_url,
                 "--tracking-uri", tracking_uri, "--quiet"]) == 0
    trials = optuna.load_study(study_name="exact", storage=storage_url).get_trials()
    counted = [t for t in trials if not t.user_attrs.get(SURPLUS_ATTR)]
    assert [t.state.name for t in counted] == ["COMPLETE"] * 3
    assert sorted(t.user_attrs[SLOT_ATTR] for t in counted) == [0, 1, 2]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("exact").experiment_id],
                              filter_string="tags.`ablate.role` = 'run'")
    assert len(runs) == 3


def test_places_enqueued_twice_still_give_n_trials(tmp_path, tracking_uri, storage_url, monkeypatch):
    # Two parents starting at the same moment both enqueue every missing place; workers train each place once.
    from ablate.study import StudySettings, load_space, prepare, run_worker
    from ablate.study.grid import enqueue_missing_slots

    space = write_space(tmp_path, "twice", 'sampler = "random"\npruner = "none"\nn_trials = 2',
                        'epochs = 1\n"scconv.order" = "none"', "lr = {low = 0.01, high = 0.1, log = true}")
    settings = StudySettings(space=load_space(space), storage_url=storage_url, tracking_uri=tracking_uri,
                             study_name="twice", overrides={}, progress=False)
    study, parent_id, _ = prepare(settings)
    for slot in (0, 1):
        study.enqueue_trial({}, user_attrs={SLOT_ATTR: slot})
    assert enqueue_missing_slots(study, settings) == 0  # every place is held (queued)
    run_worker(settings, parent_id, study=study)
    trials = study.get_trials()
    assert len(trials) == 4 and sum(bool(t.user_attrs.get(SURPLUS_ATTR)) for t in trials) == 2
    assert [t.state.name for t in trials if not t.user_attrs.get(SURPLUS_ATTR)] == ["COMPLETE"] * 2


# -- Ctrl-C ---------------------------------------------------------------------------------------------------


def _running_run(db: Path) -> bool:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE "
                               "r.status = 'RUNNING' AND t.key = 'ablate.role' AND t.value = 'run'").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def test_ctrl_c_during_a_study_is_one_line_and_marks_the_trial_interrupted(tmp_path, capsys):
    space = write_space(tmp_path, "stopped", 'sampler = "grid"\npruner = "none"',
                        'epochs = 200\n"scconv.order" = "none"', "seed = [0, 1]")
    tracking, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, "-m", "ablate.cli", "study", "--space", space, "--storage", storage,
           "--tracking-uri", tracking, "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        deadline = time.monotonic() + 120
        while not _running_run(tmp_path / "mlflow.db") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(1.0)  # inside the epochs
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "failed" not in err, err
    assert err.strip().splitlines()[-1] == "ablate: interrupted"

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("stopped")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'run'")
    assert run.info.status == track.KILLED
    assert run.data.tags[OPTUNA_STATE_TAG] == "FAIL" and run.data.tags["failure"] == track.INTERRUPTED
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'study'")
    assert parent.info.status == track.KILLED
    trial = optuna.load_study(study_name="stopped", storage=storage).get_trials()[0]
    assert trial.state.name == "FAIL" and trial.user_attrs[FAILURE_ATTR] == track.INTERRUPTED

    assert main(["status", "--space", space, "--storage", storage, "--tracking-uri", tracking]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "failure" in table[0] and "interrupted" in table[1]


# -- ablate ui ------------------------------------------------------------------------------------------------


def test_ui_with_a_tracking_server_prints_its_address_and_starts_nothing(capsys, monkeypatch):
    def no_server(*args, **kwargs):
        raise AssertionError("ablate ui started a process for a tracking server")

    monkeypatch.setattr(subprocess, "Popen", no_server)
    assert main(["ui", "--tracking-uri", "http://user:secret@mlflow.example:5000"]) == 0
    out = capsys.readouterr().out
    assert "http://user:***@mlflow.example:5000" in out and "secret" not in out


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_ui_refuses_a_port_out_of_range(bare, capsys, port):
    line = one_line_error(capsys, main(["ui", "--port", port]))
    assert f"port={port}" in line and "1..65535" in line
    assert list(bare.iterdir()) == []


def test_ui_on_a_busy_port_is_one_line_and_prints_no_url(bare, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = one_line_error(capsys, main(["ui", "--port", str(port)]))
    assert f"port={port} is not usable" in line
    assert list(bare.iterdir()) == []


# -- more adversarial input -----------------------------------------------------------------------------------


def test_an_absurd_image_size_is_one_line_not_an_allocation(bare, capsys):
    line = one_line_error(capsys, main(["train", "--set", "image_size=100000", "--quiet"]))
    assert "image_size=100000" in line and "8..4096" in line
    assert list(bare.iterdir()) == []


def test_running_out_of_memory_is_one_line_and_other_errors_still_raise(capsys):
    import argparse

    from ablate.cli.common import run_cli

    def parser_raising(exc):
        p = argparse.ArgumentParser()
        p.set_defaults(func=lambda args: (_ for _ in ()).throw(exc))
        return p

    rc = run_cli("ablate", parser_raising(RuntimeError("DefaultCPUAllocator: can't allocate memory: 7e13 bytes")), [])
    line = one_line_error(capsys, rc, expected_rc=1)
    assert line.startswith("ablate: error: out of memory") and "batch_size" in line
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli("ablate", parser_raising(RuntimeError("a bug")), [])


def test_status_of_a_folder_as_storage_is_one_line(bare, capsys):
    (bare / "folder.db").mkdir()
    line = one_line_error(capsys, main(["status", "--space", "sru_cru_order", "--storage",
                                        f"sqlite:///{bare / 'folder.db'}"]))
    assert "does not exist" in line
    assert [p.name for p in bare.iterdir()] == ["folder.db"]


def test_every_config_key_has_its_help_line():
    """``ablate train --help`` lists every key with what it does; a field whose ``#:`` comment sits above it
    instead of on its line (as ``scconv.recompute``'s first did) would show an empty description."""
    from ablate.config import field_docs

    docs = field_docs()
    assert "scconv.recompute" in docs and "measured cost" in docs["scconv.recompute"]
    assert [key for key, doc in docs.items() if not doc.strip()] == []
