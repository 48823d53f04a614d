"""Epoch seconds of `ablate train` on the embedded digits set: baseline (order none) vs SCConv (sru_cru).

The training issue's benchmark: real tracked runs (into a temporary store), orders interleaved A B A B so that
machine drift hits both, median epoch seconds over the epochs after the first (warm-up), ratio against the
baseline of the same invocation.

    python benchmarks/epoch_time.py [--epochs 3] [--rounds 2] [--backbone resnet20] [--impl reference efficient]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


def main(argv: list[str] | None = None) -> int:
    from ablate.config import RunConfig
    from ablate.train import run_training

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--backbone", default="resnet20")
    p.add_argument("--impl", nargs="+", default=["reference", "efficient"])
    args = p.parse_args(argv)

    variants = [("none", "reference")] + [("sru_cru", impl) for impl in args.impl]
    seconds: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    val_acc: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        os.environ["SCCONV_ARTIFACT_ROOT"] = f"{tmp}/artifacts"
        for _ in range(args.rounds):
            for order, impl in variants:
                cfg = RunConfig.from_dict({"backbone": args.backbone, "scconv.order": order, "scconv.impl": impl,
                                           "epochs": args.epochs, "experiment": "epoch-time", "log_checkpoint": False})
                result = run_training(cfg, tracking_uri=uri, progress=False)
                seconds[(order, impl)] += [row["epoch_seconds"] for row in result.history[1:]]
                val_acc[(order, impl)].append(result.final["val_acc"])
    base = statistics.median(seconds[variants[0]])
    print(f"{'backbone':<10} {'order':<8} {'impl':<10} {'epoch_s':>8} {'ratio':>6} {'val_acc':>8}  (digits, "
          f"{args.epochs} epochs x {args.rounds} rounds, median after warm-up, {os.cpu_count()} cores)")
    for order, impl in variants:
        med = statistics.median(seconds[(order, impl)])
        shown_impl = "-" if order == "none" else impl
        print(f"{args.backbone:<10} {order:<8} {shown_impl:<10} {med:>8.2f} {med / base:>6.2f} "
              f"{statistics.mean(val_acc[(order, impl)]):>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
