"""`analysis`: read tracked runs back and explain them. User errors: one line on stderr, exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ablate.cli.common import OneLineParser, add_tracking_uri, run_cli
from ablate.errors import ConfigError
from ablate.fileio import writable_problem


def _non_negative(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not valid; accepted: an integer >= 0")
    return n


def _positive(value: str) -> int:
    n = _non_negative(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not valid; accepted: an integer >= 1")
    return n


def _radius(value: str) -> float:
    try:
        r = float(value)
    except ValueError:
        r = -1.0
    if not 0.0 < r < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not valid; accepted: a number > 0")
    return r


def _params_list(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{value!r} is not valid; accepted: comma-separated param names")
    return items


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import make_report
    from analysis.runs import make_client

    out = Path(args.out) if args.out else Path("reports") / args.experiment
    problem = writable_problem(out, folder=True)
    if problem:  # before reading any run: a bad folder must cost nothing and leave nothing
        raise ConfigError(f"--out={str(out)!r} is not valid: {problem}; accepted: a folder that can be created or written")
    client = make_client(args.tracking_uri)
    index, run_id = make_report(client, args.experiment, out, group_by=args.group_by, baseline=args.baseline,
                                from_epoch=args.from_epoch, sensitivity=args.sensitivity, log=not args.no_log)
    if run_id:
        print(f"logged to MLflow run {run_id} (artifacts under report/)")
    print(index.resolve())
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from analysis.attribution import run_sensitivity, sensitivity_ratios
    from analysis.runs import make_client

    client = make_client(args.tracking_uri)
    run_ids = {"run": args.run_id}
    if args.baseline_run_id:
        run_ids = {"baseline": args.baseline_run_id, **run_ids}
    table = run_sensitivity(client, run_ids, n_images=args.images, radius=args.radius, n_perturb=args.perturbations)
    if args.baseline_run_id:
        table = sensitivity_ratios(table, "baseline")
    cols = [c for c in table.columns if not c.startswith("flip_share.")]
    print(table[cols].to_string(index=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="analysis", description="Read tracked SCConv runs back and explain why validation "
                                                  "loss fluctuates.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True

    p = sub.add_parser(
        "report", help="fluctuation report of an experiment (HTML, Markdown, CSV; logged to MLflow)",
        description="Read every FINISHED run of an experiment that has train_loss and val_loss histories, group "
                    "seeds into variants, compare each variant's curve fluctuation after warm-up with the baseline (run = "
                    "unit; pre-declared primary metric val_loss.resid_sd: ratio of geometric means, permutation test, "
                    "CI by inverting it, BH q), relate it to gate statistics and prediction churn, and "
                    "write DIR/index.html, summary.md, comparisons.csv and run_metrics.csv. The report is also "
                    "logged as artifacts (report/) of the study's parent run, or of a new run tagged "
                    "ablate.role=report.")
    p.add_argument("--experiment", required=True, help="MLflow experiment name (a study's runs use the study name)")
    add_tracking_uri(p)
    p.add_argument("--group-by", type=_params_list, default=None, metavar="PARAM,...",
                   help="params that define a variant (default: the params that vary across runs, less seed and "
                        "bookkeeping params such as run_name and data_root; see analysis/runs.py)")
    p.add_argument("--baseline", default=None, metavar="LABEL",
                   help="variant label to compare against (default: the variant with scconv.order=none)")
    p.add_argument("--from-epoch", type=_non_negative, default=None, metavar="K",
                   help="compute curve metrics on epochs >= K (default: the window rule, which starts after every "
                        "run's warm-up: the latest epoch where a run's val_loss trend comes within 25%% of its total "
                        "change of its final level, leaving at least 6 epochs; see docs/report.md)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default reports/<experiment>)")
    p.add_argument("--sensitivity", action="store_true",
                   help="also measure captum sensitivity of gate masks and GradCAM attributions on one "
                        "checkpoint per variant (slower; off by default)")
    p.add_argument("--no-log", action="store_true", help="write the files only; do not log them to MLflow")
    p.set_defaults(func=cmd_report)

    s = sub.add_parser(
        "sensitivity", help="captum sensitivity of a run's gate masks and attributions to input perturbations",
        description="Load the final checkpoint of a run (and of a baseline run), take the run's fixed gate-probe "
                    "validation images, and report captum.metrics.sensitivity_max of the SRU masks and of "
                    "GradCAM attributions at the last SCConv layer, plus the share of gate bits that flip under "
                    "uniform L-inf perturbations. CPU, about a minute for a ResNet-20.")
    s.add_argument("--run-id", required=True, help="MLflow run id of the variant's run (needs checkpoint/checkpoint.pt)")
    s.add_argument("--baseline-run-id", default=None, help="MLflow run id to compare with, on the same images")
    add_tracking_uri(s)
    s.add_argument("--images", type=_positive, default=8, help="validation images (default 8)")
    s.add_argument("--perturbations", type=_positive, default=4, help="perturbations per image (default 4)")
    s.add_argument("--radius", type=_radius, default=0.02, help="L-inf radius in normalised input units (default 0.02)")
    s.set_defaults(func=cmd_sensitivity)
    return parser


def main(argv: list[str] | None = None) -> int:
    # One progress bar per downloaded artifact (predictions, checkpoints) would bury the report's output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return run_cli("analysis", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
