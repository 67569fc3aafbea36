"""Start servers in process groups of their own, wait until they answer, and stop exactly
those groups: never a broad ``kill 0`` or a kill by name."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path


class ServerError(RuntimeError):
    """A server could not be started or stopped; the message says which and why."""


def server_env() -> dict[str, str]:
    """This process's environment for a server, with Prefect's analytics off unless set
    (the servers reach no analytics endpoint)."""
    return {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
    }


def prefect_server(host: str, port: int) -> tuple[list[str], str]:
    """The command of a Prefect server on ``host:port`` and the URL that answers once it is up.

    Start it with :func:`prefect_server_env` in its environment.
    """
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    return command, f"http://{host}:{port}/api/health"


def prefect_server_env(host: str, port: int) -> dict[str, str]:
    """What a Prefect server on ``host:port`` needs in its environment for its UI.

    The UI asks its API at ``PREFECT_UI_API_URL``, which ``--port`` leaves at the default
    port's URL (from ``PREFECT_SERVER_API_PORT``): without this, a UI on another port
    than 4200 shows "Can't connect to Server API at http://127.0.0.1:4200/api".
    """
    return {
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://{host}:{port}/api",
    }


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        # As the servers do: a port whose last connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def require_free_ports(host: str, ports: Mapping[str, int]) -> None:
    """Fail before starting anything when a port is taken, naming the port and its user."""
    for name, port in ports.items():
        if not port_is_free(host, port):
            raise ServerError(f"{name}: port {host}:{port} is already in use; stop what uses it or choose another port")


def start_in_own_group(
    command: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path | None = None
) -> subprocess.Popen:
    """Start ``command`` as the leader of a new session; its output is appended to
    ``log_path``, or goes to the caller's terminal when that is None.

    The new session is also a new process group, so every process the server forks
    (uvicorn workers, job runners, Prefect's services) can be stopped together, and a
    Ctrl-C in the caller's terminal reaches only the caller, which then stops the group.
    """
    if log_path is None:
        return subprocess.Popen(list(command), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, start_new_session=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22),
    or None when no such process exists. A pid with other start ticks was reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 2 is the command name in parentheses and may itself hold spaces or ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until_answers(url: str, process: subprocess.Popen, log_path: Path | None, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail early, with the log's tail, if the server exits."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ServerError(f"{url}: the server exited with code {process.returncode}:\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise ServerError(f"{url}: no answer after {timeout:.0f} s:\n{log_tail(log_path)}")
        time.sleep(0.5)


def log_tail(log_path: Path | None, chars: int = 3000) -> str:
    if log_path is None:
        return "(its output is above)"
    try:
        return log_path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return f"(no log at {log_path})"


def stop_group(pgid: int, leader: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    """SIGTERM the process group ``pgid``, then SIGKILL whatever is left after ``timeout``.

    ``leader`` is the group leader when it is the caller's child: it is reaped here, as a
    zombie would keep the group alive.
    """
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while (leader is not None and leader.poll() is None) or group_alive(pgid):
        if time.monotonic() > deadline:
            os.killpg(pgid, signal.SIGKILL)
            break
        time.sleep(0.2)
    if leader is not None:
        leader.wait(timeout=timeout)
