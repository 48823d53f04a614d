"""`ablate train`: train one variant, tracked in MLflow."""

from __future__ import annotations

import argparse

from ablate import track
from ablate.cli.common import EXIT_FAILURE, add_scconv_args, add_tracking_uri, choices_type, scconv_overrides
from ablate.cli.ui import ui_command
from ablate.config import DATASETS, DEVICES, RunConfig, blame_user_keys, field_docs, parse_assignments
from ablate.errors import ConfigError


def register(sub) -> None:
    """Add the ``train`` command to the ``ablate`` parser."""
    keys = "\n".join(f"  {k:<22} {doc}" for k, doc in field_docs().items())
    p = sub.add_parser(
        "train", help="train one variant, tracked in MLflow",
        description="Train one SCConv variant end to end and track it in MLflow (params, per-epoch curves, gate "
                    "statistics, predictions, checkpoint).",
        epilog=f"Every config key can be set with --set KEY=VALUE:\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=choices_type("dataset", DATASETS), default=None,
                   help="digits (embedded, default), cifar100, food101, imagefolder")
    p.add_argument("--data-root", default=None, help="folder holding the dataset (default ~/.cache/scconv-ablate/data)")
    p.add_argument("--download", action="store_true", default=None, help="fetch cifar100/food101 when missing")
    p.add_argument("--backbone", default=None, help="resnet20 (default), resnet56, resnet50, densenet121")
    p.add_argument("--placement", default=None, help="DenseNet: replace (default) or insert")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the training preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: the preset's)")
    p.add_argument("--image-size", type=int, default=None, help="input side (digits 32, others 224)")
    p.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    p.add_argument("--device", type=choices_type("device", DEVICES), default=None, help="auto (default), cpu, cuda")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default scconv-ablate)")
    add_tracking_uri(p)
    p.add_argument("--set", dest="assignments", action="append", metavar="KEY=VALUE", default=[],
                   help="set any config key (repeatable), e.g. --set scconv.alpha=0.25")
    p.add_argument("--resume", metavar="RUN_ID", default=None, help="continue an interrupted run from its checkpoint")
    p.add_argument("--no-checkpoint", action="store_true", help="do not keep the final checkpoint as an artifact")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_scconv_args(p, order_default=None)
    p.set_defaults(func=cmd_train)


_ARG_KEYS = {"dataset": "dataset", "data_root": "data_root", "download": "download", "backbone": "backbone",
             "placement": "placement", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
             "image_size": "image_size", "seed": "seed", "device": "device", "experiment": "experiment"}


def user_settings(args: argparse.Namespace) -> dict:
    """The flat config keys the user gave: the named options, then --set (the last word wins)."""
    flat = {key: getattr(args, attr) for attr, key in _ARG_KEYS.items() if getattr(args, attr) is not None}
    flat.update(scconv_overrides(args))
    if args.no_checkpoint:
        flat["log_checkpoint"] = False
    flat.update(parse_assignments(args.assignments))
    return flat


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config: defaults, then the named options, then --set (the last word wins)."""
    return RunConfig.from_dict(user_settings(args))


def cmd_train(args: argparse.Namespace) -> int:
    """Train one run and print its outcome; 1 when it did not end FINISHED."""
    from ablate.train import run_training

    flat = user_settings(args)
    cfg = RunConfig.from_dict(flat)
    uri = track.resolve_tracking_uri(args.tracking_uri)
    track.check_writable(uri)
    db = track.sqlite_path(uri)
    if args.resume and db is not None and not db.is_file():
        raise ConfigError(f"resume={args.resume!r} is not valid: the tracking store {db} does not exist; accepted: "
                          "the id of a run in the store given by --tracking-uri")
    track.check_reachable(uri)
    try:
        result = run_training(cfg, tracking_uri=uri, resume_run_id=args.resume, progress=not args.quiet)
    except ConfigError as e:
        raise blame_user_keys(e, flat) from None
    final = result.final
    summary = (f"run {result.run_id} {result.status} after {result.epochs_run} epochs"
               + (f": val_loss {final['val_loss']:.4f}, val_acc {final['val_acc']:.4f}" if final else "")
               + (f" ({result.failure})" if result.failure else ""))
    print(summary)
    print(f"open the MLflow UI: {ui_command(uri)}")
    return 0 if result.status == track.FINISHED else EXIT_FAILURE
