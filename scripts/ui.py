"""``make ui``: the Prefect server and the MLflow UI in the foreground, on loopback.

Each server runs in a process group of its own. Ctrl-C (or SIGTERM, or closing the
terminal) stops exactly those two groups, the servers and the workers they forked,
and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

from scripts.processes import (
    ServerError,
    prefect_server,
    prefect_server_env,
    require_free_ports,
    server_env,
    start_in_own_group,
    stop_group,
    wait_until_answers,
)

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequested(Exception):
    """A signal asked the servers to stop."""


class StopSignals:
    """Turns the stop signals into :class:`StopRequested`, except while a server is being
    started and recorded: a signal then waits until the record is made, so that the
    clean-up knows every server it must stop."""

    def __init__(self) -> None:
        self.deferring = False
        self.pending: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.deferring:
            self.pending = signum
            return
        raise StopRequested(signal.Signals(signum).name)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None:
            raise StopRequested(signal.Signals(self.pending).name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlflow-store", required=True, help="MLflow backend store URI (the SQLite database)")
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds each server may take to answer")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = server_env()
    servers = {
        "MLflow UI": (
            [
                sys.executable,
                "-m",
                "mlflow",
                "ui",
                "--backend-store-uri",
                args.mlflow_store,
                "--host",
                HOST,
                "--port",
                str(args.mlflow_port),
            ],
            f"http://{HOST}:{args.mlflow_port}/health",
        ),
        "Prefect server": prefect_server(HOST, args.prefect_port),
    }
    try:
        require_free_ports(HOST, {"MLflow UI": args.mlflow_port, "Prefect server": args.prefect_port})
    except ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    stop_signals = StopSignals()
    started: dict[str, subprocess.Popen] = {}
    exit_code = 0
    try:
        for name, (command, _) in servers.items():
            own_env = {**env, **prefect_server_env(HOST, args.prefect_port)} if name == "Prefect server" else env
            with stop_signals.deferred():
                started[name] = start_in_own_group(command, own_env, REPO)
            print(f"started the {name} (pid {started[name].pid})", flush=True)
        for name, (_, url) in servers.items():
            wait_until_answers(url, started[name], None, args.timeout)
        print(
            f"Prefect UI: http://{HOST}:{args.prefect_port}    MLflow UI: http://{HOST}:{args.mlflow_port}    "
            "Ctrl-C stops both",
            flush=True,
        )
        # Both run until a signal arrives or one of them exits on its own.
        while all(process.poll() is None for process in started.values()):
            time.sleep(0.5)
        exited = [name for name, process in started.items() if process.poll() is not None]
        print(f"error: the {' and the '.join(exited)} exited on its own", file=sys.stderr)
        exit_code = 1
    except StopRequested as request:
        print(f"{request}: stopping", flush=True)
    except ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        exit_code = 1
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave a server behind.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        for name, process in reversed(started.items()):
            stop_group(process.pid, leader=process)
            print(f"stopped the {name} (pid {process.pid})", flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
