"""`ablate ui`: the MLflow UI on 127.0.0.1 over the tracking store (or the address of a tracking server), and direct
links to each study's runs page, compare page and report (docs/ui.md)."""

from __future__ import annotations

import argparse
import shlex
import socket
import subprocess
import sys
import time

from ablate import track
from ablate.cli.common import EXIT_FAILURE, add_tracking_uri
from ablate.errors import ConfigError, check, is_int, redact_url

#: Seconds `mlflow ui` gets to start listening before the command gives up.
START_TIMEOUT_S = 60


def register(sub) -> None:
    """Add the ``ui`` command to the ``ablate`` parser."""
    u = sub.add_parser("ui", help="open the MLflow UI on 127.0.0.1 for the tracking store",
                       description="Start `mlflow ui` on 127.0.0.1 over the default store (or --tracking-uri); for "
                                   "an http(s) tracking server, print its address (it serves the UI itself). Then "
                                   "print each study's links: its runs page (model training, comparison view), its "
                                   "compare page and its report.")
    add_tracking_uri(u)
    u.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    u.set_defaults(func=cmd_ui)


def ui_command(uri: str) -> str:
    """The shell command that opens the MLflow UI on ``uri``."""
    default = track.resolve_tracking_uri(None) == uri
    return "ablate ui" if default else f"ablate ui --tracking-uri {shlex.quote(uri)}"


def check_port_free(port: int) -> None:
    """Raise ConfigError unless ``port`` is a valid TCP port that nothing listens on at 127.0.0.1."""
    check("port", port, is_int(port) and 1 <= port <= 65535, "an integer in 1..65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            raise ConfigError(f"port={port} is not usable ({e.strerror or e}); accepted: a free port, "
                              "e.g. --port 5001") from None


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the UI until Ctrl-C (status: mlflow's); a tracking server's own address is printed, nothing started."""
    uri = track.resolve_tracking_uri(args.tracking_uri)
    if track.is_http(uri):
        print(f"MLflow UI on {redact_url(uri)} (served by the tracking server)")
        try:
            print_links(track.client(uri), uri, args.port)
        except ConfigError as e:  # the address is what was asked for; the links need the server to answer
            print(f"(no study links: {e})")
        return 0
    check_port_free(args.port)
    db = track.sqlite_path(uri)
    if db is not None and not db.is_file():
        track.check_writable(uri)
    track.client(uri)  # creates the SQLite store so the UI starts on a fresh checkout
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port)]
    server = subprocess.Popen(cmd)
    try:
        if not _wait_listening(server, args.port):
            server.terminate()
            print(f"ablate: error: mlflow ui did not start on port {args.port} (exit status {server.wait()})",
                  file=sys.stderr)
            return EXIT_FAILURE
        print(f"MLflow UI on http://127.0.0.1:{args.port} (Ctrl-C to stop)")
        print_links(track.client(uri), uri, args.port)
        return server.wait()
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait()


def print_links(client, uri: str, port: int) -> None:
    """Print each study's direct links (runs page in model-training mode with the comparison view, compare page,
    report); nothing when the store holds no study."""
    from ablate.ui import format_study_links, study_links

    for line in format_study_links(study_links(client, uri, port=port)):
        print(line, flush=True)


def _wait_listening(server: subprocess.Popen, port: int) -> bool:
    """Whether ``server`` accepts connections on ``port`` before it exits or START_TIMEOUT_S passes."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and server.poll() is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False
