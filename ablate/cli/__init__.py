"""`ablate`: the command-line front end. Maps user errors to one line on stderr and exit status 2.

Each command lives in its own module with a ``register(sub)`` that adds its parser; heavy libraries (torch,
MLflow, Optuna) are imported inside the commands, so ``ablate --help`` stays fast.
"""

from __future__ import annotations

import argparse

from ablate.cli import bench, profile, study, train, ui
from ablate.cli.common import OneLineParser, run_cli


def build_parser() -> argparse.ArgumentParser:
    """The ``ablate`` parser with every command."""
    parser = OneLineParser(prog="ablate", description="Build, train and search SCConv variants.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for command in (profile, train, ui, study, bench):
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``ablate`` with ``argv`` (default: the process arguments); returns the exit status."""
    return run_cli("ablate", build_parser(), argv)
