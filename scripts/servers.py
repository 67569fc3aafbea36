"""The team's shared servers on PostgreSQL, on loopback by default.

- MLflow tracking server: runs and the model registry in PostgreSQL, artifacts proxied
  by the server (``--artifacts-destination``: a folder, or ``s3://bucket/prefix``).
- Prefect server: flow runs, deployments and work pools in PostgreSQL.
- A third database for Optuna's sweeps (``emonet tune``), which the sweep processes open
  themselves: ``start`` prints the ``EMONET_OPTUNA_STORAGE`` to export.

    python -m scripts.servers start [--database-url postgresql://USER:PASSWORD@HOST:PORT/DB]
    python -m scripts.servers stop

``make servers`` and ``make servers-stop`` call these. With a URL (or
``EMONET_DATABASE_URL``), both servers use that PostgreSQL, in databases named by
``--mlflow-database``, ``--prefect-database`` and ``--optuna-database`` (created when missing). Without one, a
local cluster is initialized once under ``.servers/`` with the machine's PostgreSQL
binaries (Debian's ``postgresql`` package) and started. ``stop`` stops exactly what
``start`` recorded in ``.servers/state.json``, and leaves all data in place.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from scripts.processes import (
    ServerError,
    log_tail,
    prefect_server,
    prefect_server_env,
    require_free_ports,
    server_env,
    start_in_own_group,
    start_ticks,
    stop_group,
    wait_until_answers,
)

logger = logging.getLogger("servers")

REPO = Path(__file__).resolve().parents[1]
STATE_FILE = "state.json"
PASSWORD_FILE = "postgres-password"
# The local cluster's superuser; it owns both databases.
SUPERUSER = "emonet"
# PostgreSQL refuses to run as root; as root, the cluster runs as this system user.
POSTGRES_SYSTEM_USER = "postgres"


# --------------------------------------------------------------------------- state


def read_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_state(state_dir: Path, state: dict[str, Any]) -> None:
    """Replace the state file atomically: a crash mid-write never leaves half a record."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".state-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle, indent=2)
    os.replace(tmp, state_dir / STATE_FILE)


# --------------------------------------------------------------------------- database URLs


def parse_server_url(server_url: str) -> URL:
    """A ``postgresql[+driver]://`` or ``postgres://`` URL, parsed; a message that never
    shows the password when it is not one."""
    try:
        url = make_url(server_url.replace("postgres://", "postgresql://", 1))
    except ArgumentError:
        raise ServerError("--database-url is not a URL: expected postgresql://USER:PASSWORD@HOST:PORT/DB") from None
    if url.get_backend_name() != "postgresql":
        raise ServerError(f"--database-url must be a postgresql:// URL, got {url.render_as_string()!r}")
    return url


def database_url(server_url: str, database: str, driver: str) -> str:
    """``server_url`` with another database and driver, the password kept and escaped."""
    return parse_server_url(server_url).set(drivername=driver, database=database).render_as_string(hide_password=False)


def create_databases(server_url: str, names: list[str]) -> None:
    """Create each database that does not exist yet (existing data is kept), connected
    to the URL's own database (``postgres`` when it names none)."""
    url = parse_server_url(server_url)
    admin_url = url.set(drivername="postgresql", database=url.database or "postgres")
    try:
        with psycopg.connect(admin_url.render_as_string(hide_password=False), autocommit=True) as conn:
            for name in names:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    logger.info("created database %s", name)
    except psycopg.Error as error:
        raise ServerError(f"PostgreSQL at {admin_url.render_as_string()}: {error}".strip()) from error


# --------------------------------------------------------------------------- local cluster


def find_postgres_bin(explicit: str | None) -> Path:
    """The folder holding initdb and pg_ctl: ``--pg-bin``, PATH, or Debian's newest version."""
    candidates = [explicit] if explicit else []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(debian, key=lambda p: [int(n) for n in re.findall(r"\d+", Path(p).parent.name)], reverse=True)
    for folder in candidates:
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    raise ServerError(
        "PostgreSQL binaries (initdb, pg_ctl) not found: install them (apt-get install -y postgresql), "
        "pass --pg-bin, or give an existing server with --database-url"
    )


def run_as_prefix() -> list[str]:
    """As root, PostgreSQL's tools run as the ``postgres`` system user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        raise ServerError(
            f"running as root, PostgreSQL needs the {POSTGRES_SYSTEM_USER!r} system user "
            "(Debian's postgresql package creates it)"
        ) from None
    return ["runuser", "-u", POSTGRES_SYSTEM_USER, "--"]


def give_to_postgres_user(path: Path) -> None:
    entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def prepare_data_dir(requested: Path, run_as: list[str]) -> Path:
    """An empty data folder the cluster's user can write.

    As root, the folder is given to the ``postgres`` user. When that user cannot reach it
    (a parent such as ``/root`` is closed to others), the cluster lives in a new folder
    under the system's temp folder instead, and ``requested`` becomes a link to it.
    """
    if requested.is_symlink() and not requested.exists():
        raise ServerError(
            f"{requested} links to {os.readlink(requested)}, which is gone (was the temp folder cleared?): "
            "remove the link to initialize a new, empty cluster"
        )
    requested.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not run_as:
        return requested
    give_to_postgres_user(requested)
    if subprocess.run([*run_as, "test", "-w", str(requested)]).returncode == 0:
        return requested
    requested.rmdir()
    outside = Path(tempfile.mkdtemp(prefix="emonet-postgres-"))
    give_to_postgres_user(outside)
    requested.symlink_to(outside, target_is_directory=True)
    logger.warning(
        "the %s user cannot reach %s: the cluster's data lives in %s (linked from there)",
        POSTGRES_SYSTEM_USER,
        requested,
        outside,
    )
    return outside


def init_cluster(bin_dir: Path, data_dir: Path, password_file: Path, host: str, run_as: list[str]) -> None:
    password = secrets.token_urlsafe(24)
    password_file.parent.mkdir(parents=True, exist_ok=True)
    password_file.touch(mode=0o600)
    password_file.write_text(password + "\n")
    # initdb reads the password from a file that its user can read; it is deleted right after.
    fd, initdb_pwfile = tempfile.mkstemp(prefix="emonet-pw-")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        if run_as:
            give_to_postgres_user(Path(initdb_pwfile))
        command = [
            *run_as,
            str(bin_dir / "initdb"),
            "-D",
            str(data_dir),
            "-U",
            SUPERUSER,
            "--auth=scram-sha-256",
            f"--pwfile={initdb_pwfile}",
            "-E",
            "UTF8",
            "--no-locale",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
    finally:
        os.unlink(initdb_pwfile)
    if result.returncode != 0:
        raise ServerError(f"initdb failed for {data_dir}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    # TCP on the chosen address only: no Unix socket in a shared folder.
    with open(data_dir / "postgresql.conf", "a") as conf:
        conf.write(f"\n# Written by scripts/servers.py\nlisten_addresses = '{host}'\nunix_socket_directories = ''\n")
    logger.info("initialized a PostgreSQL cluster in %s (superuser %s)", data_dir, SUPERUSER)


def ensure_local_cluster(args: argparse.Namespace, state: dict[str, Any]) -> str:
    """Initialize (first time) and start the local cluster; return its server URL."""
    bin_dir = find_postgres_bin(args.pg_bin)
    run_as = run_as_prefix()
    password_file = args.state_dir / PASSWORD_FILE
    data_dir = Path(args.pg_data or args.state_dir / "postgres")
    if (data_dir / "PG_VERSION").is_file():
        data_dir = data_dir.resolve()
        if not password_file.is_file():
            raise ServerError(f"the cluster in {data_dir} exists but its password file {password_file} is missing")
    else:
        data_dir = prepare_data_dir(data_dir, run_as)
        init_cluster(bin_dir, data_dir, password_file, args.host, run_as)
    pg_ctl = [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data_dir)]
    if subprocess.run([*pg_ctl, "status"], capture_output=True).returncode == 0:
        raise ServerError(f"a PostgreSQL server already runs on {data_dir}: stop it first (pg_ctl -D {data_dir} stop)")
    log_path = data_dir / "postgres.log"
    result = subprocess.run(
        [
            *pg_ctl,
            "-l",
            str(log_path),
            "-w",
            "-t",
            str(int(args.timeout)),
            "-o",
            f"-h {args.host} -p {args.pg_port}",
            "start",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise ServerError(
            f"PostgreSQL did not start on {args.host}:{args.pg_port}:\n{result.stderr}{log_tail(log_path)}"
        )
    state["postgres"] = {"bin_dir": str(bin_dir), "data_dir": str(data_dir), "run_as": run_as, "port": args.pg_port}
    write_state(args.state_dir, state)
    logger.info("PostgreSQL runs on %s:%d (data in %s, binaries in %s)", args.host, args.pg_port, data_dir, bin_dir)
    url = URL.create(
        "postgresql",
        username=SUPERUSER,
        password=password_file.read_text().strip(),
        host=args.host,
        port=args.pg_port,
        database="postgres",
    )
    return url.render_as_string(hide_password=False)


def stop_local_cluster(postgres: dict[str, Any]) -> None:
    pg_ctl = [*postgres["run_as"], str(Path(postgres["bin_dir"]) / "pg_ctl"), "-D", postgres["data_dir"]]
    if subprocess.run([*pg_ctl, "status"], capture_output=True).returncode != 0:
        logger.info("PostgreSQL on %s was already stopped", postgres["data_dir"])
        return
    result = subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ServerError(f"pg_ctl stop failed for {postgres['data_dir']}: {result.stderr.strip()}")
    logger.info("stopped PostgreSQL on %s", postgres["data_dir"])


# --------------------------------------------------------------------------- MLflow and Prefect


def server_commands(args: argparse.Namespace, server_url: str) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """For each server: its command, its environment and the URL that answers when it is up.

    The database URLs travel in the environment, so the passwords never show in ``ps``.
    """
    base_env = server_env()
    artifacts = args.artifacts_destination
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).resolve())
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    mlflow_env = {
        **base_env,
        "MLFLOW_BACKEND_STORE_URI": database_url(server_url, args.mlflow_database, "postgresql+psycopg"),
    }
    prefect_env = {
        **base_env,
        **prefect_server_env(args.host, args.prefect_port),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url(server_url, args.prefect_database, "postgresql+asyncpg"),
    }
    prefect_command, prefect_health = prefect_server(args.host, args.prefect_port)
    return {
        "mlflow": (
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                args.host,
                "--port",
                str(args.mlflow_port),
                "--workers",
                str(args.mlflow_workers),
                "--artifacts-destination",
                artifacts,
            ],
            mlflow_env,
            f"http://{args.host}:{args.mlflow_port}/health",
        ),
        "prefect": (prefect_command, prefect_env, prefect_health),
    }


def start(args: argparse.Namespace) -> None:
    args.state_dir = args.state_dir.resolve()
    previous = read_state(args.state_dir)
    if previous is not None:
        alive = [s["name"] for s in previous.get("servers", []) if start_ticks(s["pid"]) == s["start_ticks"]]
        if alive or previous.get("postgres"):
            raise ServerError(
                f"{args.state_dir / STATE_FILE} records servers that were started and not stopped "
                f"({', '.join(alive) or 'PostgreSQL'}): run `make servers-stop` first"
            )
    ports = {"MLflow": args.mlflow_port, "Prefect": args.prefect_port}
    if not args.database_url:
        ports["PostgreSQL"] = args.pg_port
    require_free_ports(args.host, ports)

    state: dict[str, Any] = {"postgres": None, "servers": []}
    write_state(args.state_dir, state)
    try:
        server_url = args.database_url or ensure_local_cluster(args, state)
        create_databases(server_url, [args.mlflow_database, args.prefect_database, args.optuna_database])
        started = []
        for name, (command, env, health_url) in server_commands(args, server_url).items():
            log_path = args.state_dir / "logs" / f"{name}.log"
            process = start_in_own_group(command, env, REPO, log_path)
            state["servers"].append(
                {"name": name, "pid": process.pid, "start_ticks": start_ticks(process.pid), "log": str(log_path)}
            )
            write_state(args.state_dir, state)
            started.append((name, process, health_url, log_path))
        for name, process, health_url, log_path in started:
            wait_until_answers(health_url, process, log_path, args.timeout)
            logger.info("%s server is up (pid %d, log %s)", name, process.pid, log_path)
    except BaseException:
        logger.error("start failed: stopping what was started")
        stop_recorded(args.state_dir, state)
        raise
    logger.info(
        "\nShared servers are running. In each shell that runs flows or loads models:\n"
        "  export MLFLOW_TRACKING_URI=http://%s:%d\n  export PREFECT_API_URL=http://%s:%d/api\n"
        "and where sweeps run (emonet tune):\n  export EMONET_OPTUNA_STORAGE=%s\n"
        "MLflow UI: http://%s:%d   Prefect UI: http://%s:%d   Stop: make servers-stop",
        args.host,
        args.mlflow_port,
        args.host,
        args.prefect_port,
        optuna_storage_hint(args, server_url),
        args.host,
        args.mlflow_port,
        args.host,
        args.prefect_port,
    )


def optuna_storage_hint(args: argparse.Namespace, server_url: str) -> str:
    """The Optuna storage URL to export, without the password itself in the log: the
    local cluster's is read from its file by the shell, a given URL's is left for the user."""
    placeholder = "PASSWORD"
    url = parse_server_url(server_url).set(
        drivername="postgresql+psycopg", database=args.optuna_database, password=placeholder
    )
    text = url.render_as_string(hide_password=False)
    if args.database_url:
        return text
    return text.replace(f":{placeholder}@", f":$(cat '{args.state_dir / PASSWORD_FILE}')@", 1)


def stop_recorded(state_dir: Path, state: dict[str, Any]) -> None:
    """Stop the servers and the cluster recorded in ``state``, newest first, then forget them."""
    for server in reversed(state.get("servers", [])):
        # A pid whose start time differs was reused by another process: not ours to stop.
        if start_ticks(server["pid"]) == server["start_ticks"]:
            stop_group(server["pid"])
            logger.info("stopped the %s server (pid %d)", server["name"], server["pid"])
        else:
            logger.info("the %s server (pid %d) was already gone", server["name"], server["pid"])
    if state.get("postgres"):
        stop_local_cluster(state["postgres"])
    (state_dir / STATE_FILE).unlink(missing_ok=True)


def stop(args: argparse.Namespace) -> None:
    state_dir = args.state_dir.resolve()
    state = read_state(state_dir)
    if state is None:
        logger.info("nothing to stop: no %s", state_dir / STATE_FILE)
        return
    stop_recorded(state_dir, state)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.servers", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start_parser = commands.add_parser("start", help="start PostgreSQL (unless --database-url), MLflow and Prefect")
    stop_parser = commands.add_parser("stop", help="stop exactly what `start` started")
    for sub in (start_parser, stop_parser):
        sub.add_argument("--state-dir", type=Path, default=REPO / ".servers", help="pid records, logs, local cluster")
    start_parser.add_argument(
        "--database-url",
        default=os.environ.get("EMONET_DATABASE_URL"),
        help="an existing PostgreSQL (postgresql://USER:PASSWORD@HOST:PORT/DB); default $EMONET_DATABASE_URL, "
        "else a local cluster under --state-dir",
    )
    start_parser.add_argument("--host", default="127.0.0.1", help="address every server binds to")
    start_parser.add_argument("--mlflow-port", type=int, default=5000)
    start_parser.add_argument("--prefect-port", type=int, default=4200)
    start_parser.add_argument("--mlflow-workers", type=int, default=2, help="uvicorn workers of the MLflow server")
    start_parser.add_argument(
        "--artifacts-destination",
        default=None,
        help="where the MLflow server stores artifacts: a folder or s3://bucket/prefix "
        "(default <state-dir>/mlflow-artifacts)",
    )
    start_parser.add_argument("--mlflow-database", default="mlflow")
    start_parser.add_argument("--prefect-database", default="prefect")
    start_parser.add_argument("--optuna-database", default="optuna", help="the sweeps' study storage")
    start_parser.add_argument("--pg-port", type=int, default=5433, help="port of the local cluster")
    start_parser.add_argument(
        "--pg-data", type=Path, default=None, help="local cluster's data (default <state-dir>/postgres)"
    )
    start_parser.add_argument("--pg-bin", default=None, help="folder with initdb and pg_ctl (default: found)")
    start_parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds each server may take to answer "
        "(the first start migrates the databases: minutes on a busy machine)",
    )
    args = parser.parse_args(argv)
    if args.command == "start" and args.artifacts_destination is None:
        args.artifacts_destination = str(args.state_dir / "mlflow-artifacts")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        (start if args.command == "start" else stop)(args)
    except ServerError as error:
        logger.error("error: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
