"""What every command line shares: the one-line parser, option types, the SCConv and tracking options, exit codes
and the runner that turns a user error into one line on stderr."""

from __future__ import annotations

import argparse
import os
import sys

from ablate.config import ATTENTIONS, GAMMA_NORMS, GATE_MODES, IMPLS, ORDERS, SCCONV_PRESETS
from ablate.errors import CheckpointError, ConfigError

EXIT_FAILURE = 1  #: the command ran but its work did not finish (a failed run, trials left, a crashed bench)
EXIT_USAGE = 2  #: a user error: bad option, value, space or store
EXIT_INTERRUPTED = 130  #: Ctrl-C


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (field, value, accepted) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def choices_type(name: str, accepted: tuple):
    """An argparse type that fails with one line naming the field and the accepted values."""

    def parse(value: str) -> str:
        if value not in accepted:
            raise argparse.ArgumentTypeError(f"{name}={value!r} is not valid; accepted: {', '.join(accepted)}")
        return value

    parse.__name__ = name
    return parse


def add_tracking_uri(p: argparse.ArgumentParser) -> None:
    """The ``--tracking-uri`` option, with the same help wherever it appears."""
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db "
                        "under the current folder)")


def add_scconv_args(p: argparse.ArgumentParser, order_default: str | None = "sru_cru") -> None:
    """The SCConv fields as options (``--order``, ``--alpha``...); None means 'not given'."""
    g = p.add_argument_group("SCConv variant (unset fields come from --preset)")
    g.add_argument("--order", type=choices_type("order", ORDERS), default=order_default,
                   help=f"composition: {', '.join(ORDERS)} (default: {order_default})")
    g.add_argument("--preset", type=choices_type("preset", tuple(SCCONV_PRESETS)), default=None,
                   help="paper (default) or reference")
    g.add_argument("--gate-mode", type=choices_type("gate_mode", GATE_MODES), default=None,
                   help=f"SRU gate: {', '.join(GATE_MODES)}")
    g.add_argument("--gate-threshold", type=float, default=None, help="SRU gate threshold in (0, 1) (default 0.5)")
    g.add_argument("--gamma-norm", type=choices_type("gamma_norm", GAMMA_NORMS), default=None, help="sum or abs")
    g.add_argument("--gn-groups", type=int, default=None, help="SRU GroupNorm groups (default 4)")
    g.add_argument("--alpha", type=float, default=None, help="CRU split ratio in (0, 1) (default 0.5)")
    g.add_argument("--squeeze-ratio", type=int, default=None, help="CRU squeeze ratio (default 2)")
    g.add_argument("--group-size", type=int, default=None, help="CRU GWC groups (default 2)")
    g.add_argument("--group-kernel", type=int, default=None, help="CRU GWC kernel size (default 3)")
    g.add_argument("--attention", type=choices_type("attention", ATTENTIONS), default=None, help="pairwise or global")
    g.add_argument("--impl", type=choices_type("impl", IMPLS), default=None, help="reference or efficient")


_SCCONV_ARG_FIELDS = ("order", "preset", "gate_mode", "gate_threshold", "gamma_norm", "gn_groups", "alpha",
                      "squeeze_ratio", "group_size", "group_kernel", "attention", "impl")


def scconv_overrides(args: argparse.Namespace) -> dict:
    """The SCConv options the user gave, as flat ``scconv.<field>`` keys."""
    return {f"scconv.{f}": getattr(args, f) for f in _SCCONV_ARG_FIELDS if getattr(args, f, None) is not None}


def run_cli(prog: str, parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse and run one command; a user error is one line on stderr and status 2, never a traceback."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # usage errors and --help: a status, not an exception, for callers of main()
            return int(e.code or 0)
        return int(args.func(args) or 0)
    except (ConfigError, CheckpointError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MemoryError, RuntimeError) as e:
        # CPU allocation failures and CUDA's OutOfMemoryError are RuntimeErrors; other RuntimeErrors are bugs.
        text = str(e)
        if not isinstance(e, MemoryError) and "out of memory" not in text and "can't allocate memory" not in text:
            raise
        print(f"{prog}: error: out of memory ({text.strip().splitlines()[0][:200] if text.strip() else 'MemoryError'}); "
              "try a smaller batch_size or image_size", file=sys.stderr)
        return EXIT_FAILURE
