"""`ablate ui`: the MLflow UI on 127.0.0.1 over the tracking store."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from ablate import track
from ablate.cli.common import add_tracking_uri


def register(sub) -> None:
    """Add the ``ui`` command to the ``ablate`` parser."""
    u = sub.add_parser("ui", help="open the MLflow UI on 127.0.0.1 for the tracking store",
                       description="Start `mlflow ui` on 127.0.0.1 over the default store (or --tracking-uri).")
    add_tracking_uri(u)
    u.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    u.set_defaults(func=cmd_ui)


def ui_command(uri: str) -> str:
    """The shell command that opens the MLflow UI on ``uri``."""
    default = track.resolve_tracking_uri(None) == uri
    return "ablate ui" if default else f"ablate ui --tracking-uri {shlex.quote(uri)}"


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the UI until Ctrl-C; the status is mlflow's."""
    uri = track.resolve_tracking_uri(args.tracking_uri)
    track.client(uri)  # creates the SQLite folder so the UI starts on a fresh checkout
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port)]
    print(f"MLflow UI on http://127.0.0.1:{args.port} (Ctrl-C to stop)")
    return subprocess.call(cmd)
