"""`ablate study`, `ablate spaces` and `ablate status`."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from ablate import track
from ablate.cli.common import EXIT_FAILURE, add_tracking_uri
from ablate.cli.ui import ui_command
from ablate.config import parse_assignments
from ablate.errors import ConfigError, check, redact_url


def register(sub) -> None:
    """Add the study commands to the ``ablate`` parser."""
    p = sub.add_parser(
        "study", help="run an Optuna study over a space (each trial a tracked training run)",
        description="Run the Optuna study of a space in studies/*.toml. Each trial is one tracked training run; a "
                    "rerun finishes only what is missing; the same command on other machines joins the study when "
                    "--storage is a shared database.")
    p.add_argument("--space", required=True, help="space name (see `ablate spaces`) or a path to a .toml file")
    p.add_argument("--set", dest="assignments", action="append", metavar="KEY=VALUE", default=[],
                   help="override a [base] setting for every trial (repeatable), e.g. --set epochs=1")
    p.add_argument("--n-trials", type=int, default=None,
                   help="grid: enqueue at most N missing cells; other samplers: N trials in the study in all "
                        "(default: the whole grid, or the space's n_trials)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes on the same storage (default 1)")
    _store_args(p)
    p.add_argument("--heartbeat", type=int, default=10,
                   help="seconds between trial heartbeats; a trial silent for 3x this is retried (default 10)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_study)

    s = sub.add_parser("spaces", help="list the search spaces", description="List the spaces in studies/*.toml.")
    s.set_defaults(func=cmd_spaces)

    st = sub.add_parser("status", help="print the trial table of an existing study",
                        description="Print the trial table of a study without running anything.")
    st.add_argument("--space", required=True, help="space name or path (its name is the default study name)")
    _store_args(st)
    st.set_defaults(func=cmd_status)


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=None,
                   help="Optuna storage (default sqlite:///mlruns/optuna.db; postgresql://... for many machines)")
    add_tracking_uri(p)
    p.add_argument("--study-name", default=None, help="study and MLflow experiment name (default: the space's)")


def _settings(args: argparse.Namespace, **extra):
    """Validate every argument and the space; nothing is created here (a bad input leaves no file behind)."""
    from ablate.study import StudySettings, check_study_name, load_space, resolve_storage

    overrides = parse_assignments(getattr(args, "assignments", None))
    space = load_space(args.space, overrides)
    if args.study_name is not None:
        check_study_name(args.study_name, "study_name")
    n_trials = getattr(args, "n_trials", None)
    if n_trials is not None:
        check("n_trials", n_trials, n_trials >= 1, "an integer >= 1")
    workers = getattr(args, "workers", 1)
    check("workers", workers, workers >= 1, "an integer >= 1")
    heartbeat = getattr(args, "heartbeat", 10)
    check("heartbeat", heartbeat, heartbeat >= 1, "an integer >= 1 (seconds)")
    storage_url, tracking_uri = resolve_storage(args.storage), track.resolve_tracking_uri(args.tracking_uri)
    return StudySettings(
        space=space, storage_url=storage_url, tracking_uri=tracking_uri, study_name=args.study_name or space.name,
        overrides=overrides, n_trials=n_trials, workers=workers, heartbeat_interval=heartbeat,
        grace_period=3 * heartbeat, **extra)


def cmd_study(args: argparse.Namespace) -> int:
    """Run the study; exit 0 when no trial is left queued or running and not every trial failed, else 1."""
    from ablate.study import check_data, format_trial_table, pending_trials, run_study
    from ablate.study.table import failure_summary

    settings = _settings(args, progress=not args.quiet)
    track.check_writable(settings.storage_url, "storage")
    track.check_writable(settings.tracking_uri)
    check_data(settings)
    track.check_reachable(settings.storage_url, "storage")
    track.check_reachable(settings.tracking_uri)
    start = time.perf_counter()
    study = run_study(settings)
    wall = time.perf_counter() - start
    print(format_trial_table(study))
    pending = pending_trials(study)
    print(f"study {settings.study_name}: {wall:.0f} s wall time"
          + (f"; {pending} trials left queued or running (rerun the same command to finish them)" if pending else ""))
    report = f"analysis report --experiment {shlex.quote(settings.study_name)}"
    if args.tracking_uri:
        report += f" --tracking-uri {shlex.quote(settings.tracking_uri)}"
    print(f"open the MLflow UI: {ui_command(settings.tracking_uri)}")
    print(f"make the report:    {report}")
    failures, every_trial_failed = failure_summary(study)
    if failures:
        print(f"study {settings.study_name}: {failures}", file=sys.stderr)
    return EXIT_FAILURE if pending or every_trial_failed else 0


def cmd_spaces(args: argparse.Namespace) -> int:
    """One line per shipped space: name, kind and size, description."""
    from ablate.study import available, load_space

    rows = []
    for name in available():
        space = load_space(name)
        size = space.size()
        kind = f"grid of {size}" if space.is_grid else f"{space.sampler}, {size} trials"
        rows.append((name, kind, space.description))
    width = max(len(r[0]) for r in rows)
    kwidth = max(len(r[1]) for r in rows)
    for name, kind, desc in rows:
        print(f"{name:<{width}}  {kind:<{kwidth}}  {desc}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the trial table of an existing study (creates nothing)."""
    import optuna

    from ablate.study import format_trial_table, make_sampler, make_storage

    settings = _settings(args, progress=False)
    shown = redact_url(settings.storage_url)
    db = track.sqlite_path(settings.storage_url)
    if db is not None and not db.is_file():
        raise ConfigError(f"storage={shown!r} does not exist; accepted: the store of a study that ran "
                          f"(`ablate study --space {args.space}` creates it)")
    storage = make_storage(settings)
    names = optuna.get_all_study_names(storage=storage)
    if settings.study_name not in names:
        raise ConfigError(f"study={settings.study_name!r} does not exist in {shown}; accepted: "
                          f"{', '.join(names) or 'none yet'} (`ablate study --space {args.space}` creates it)")
    study = optuna.load_study(study_name=settings.study_name, storage=storage, sampler=make_sampler(settings.space))
    print(format_trial_table(study))
    return 0
