"""`ablate`: the command-line front end. Maps user errors to one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys

from ablate.config import (
    ATTENTIONS,
    GAMMA_NORMS,
    GATE_MODES,
    IMPLS,
    ORDERS,
    PLACEMENTS,
    SCCONV_PRESETS,
    ConfigError,
    ModelConfig,
    RunConfig,
)

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (field, value, accepted) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _choices_type(name: str, accepted: tuple):
    """An argparse type that fails with one line naming the field and the accepted values."""

    def parse(value: str) -> str:
        if value not in accepted:
            raise argparse.ArgumentTypeError(f"{name}={value!r} is not valid; accepted: {', '.join(accepted)}")
        return value

    parse.__name__ = name
    return parse


def add_scconv_args(p: argparse.ArgumentParser, order_default: str | None = "sru_cru") -> None:
    """The SCConv fields as options (``--order``, ``--alpha``...); None means 'not given'."""
    g = p.add_argument_group("SCConv variant (unset fields come from --preset)")
    g.add_argument("--order", type=_choices_type("order", ORDERS), default=order_default,
                   help=f"composition: {', '.join(ORDERS)} (default: {order_default})")
    g.add_argument("--preset", type=_choices_type("preset", tuple(SCCONV_PRESETS)), default=None,
                   help="paper (default) or reference")
    g.add_argument("--gate-mode", type=_choices_type("gate_mode", GATE_MODES), default=None,
                   help=f"SRU gate: {', '.join(GATE_MODES)}")
    g.add_argument("--gate-threshold", type=float, default=None, help="SRU gate threshold in (0, 1) (default 0.5)")
    g.add_argument("--gamma-norm", type=_choices_type("gamma_norm", GAMMA_NORMS), default=None, help="sum or abs")
    g.add_argument("--gn-groups", type=int, default=None, help="SRU GroupNorm groups (default 4)")
    g.add_argument("--alpha", type=float, default=None, help="CRU split ratio in (0, 1) (default 0.5)")
    g.add_argument("--squeeze-ratio", type=int, default=None, help="CRU squeeze ratio (default 2)")
    g.add_argument("--group-size", type=int, default=None, help="CRU GWC groups (default 2)")
    g.add_argument("--group-kernel", type=int, default=None, help="CRU GWC kernel size (default 3)")
    g.add_argument("--attention", type=_choices_type("attention", ATTENTIONS), default=None, help="pairwise or global")
    g.add_argument("--impl", type=_choices_type("impl", IMPLS), default=None, help="reference or efficient")


_SCCONV_ARG_FIELDS = ("order", "preset", "gate_mode", "gate_threshold", "gamma_norm", "gn_groups", "alpha",
                      "squeeze_ratio", "group_size", "group_kernel", "attention", "impl")


def scconv_overrides(args: argparse.Namespace) -> dict:
    """The SCConv options the user gave, as flat ``scconv.<field>`` keys."""
    return {f"scconv.{f}": getattr(args, f) for f in _SCCONV_ARG_FIELDS if getattr(args, f, None) is not None}


# -- commands ----------------------------------------------------------------------------------


def cmd_profile(args: argparse.Namespace) -> int:
    from ablate.profile import format_table, profile_rows

    flat = scconv_overrides(args)
    scconv = RunConfig.from_dict(flat).model.scconv
    model_cfg = ModelConfig(backbone=args.backbone, num_classes=args.num_classes, placement=args.placement, scconv=scconv)
    rows = profile_rows(model_cfg, image_size=args.image_size, compare=args.compare)
    if args.format == "json":
        import json

        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ablate", description="Build, train and search SCConv variants.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True

    p = sub.add_parser("profile", help="params and MACs of a backbone with an SCConv variant",
                       description="Count parameters and MACs (conv/linear multiply-accumulates, FLOPs/2).")
    p.add_argument("--backbone", default="resnet50", help="resnet20, resnet56, resnet50, densenet121 (default resnet50)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    p.add_argument("--image-size", type=int, default=224, help="input side in pixels (default 224)")
    p.add_argument("--placement", type=_choices_type("placement", PLACEMENTS), default="replace",
                   help="DenseNet: replace the 3x3 conv or insert SCConv before it")
    p.add_argument("--compare", action="store_true", help="add the order=none baseline and ratios against it")
    p.add_argument("--format", type=_choices_type("format", ("table", "json")), default="table", help="table or json")
    add_scconv_args(p)
    p.set_defaults(func=cmd_profile)

    for register in _registrars():
        register(sub)
    return parser


def _registrars():
    """Commands defined beside the code they run (train, study, bench...), registered lazily."""
    regs = []
    for mod, attr in (("ablate.train.cli", "register"), ("ablate.study_cli", "register"), ("ablate.bench", "register")):
        try:
            module = __import__(mod, fromlist=[attr])
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):
                continue  # that command is not built yet
            raise
        regs.append(getattr(module, attr))
    return regs


def run_cli(prog: str, parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse and run one command; a user error is one line on stderr and status 2, never a traceback."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # usage errors and --help: a status, not an exception, for callers of main()
            return int(e.code or 0)
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run_cli("ablate", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
