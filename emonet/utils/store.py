"""Where MLflow keeps runs and models, and the checks that keep a store whole.

Light on purpose (standard library and filelock, no MLflow import): every path that opens a
store checks it here first, serving code included (:mod:`emonet.inference.csv_scoring`, ``make serve``).
``python -m emonet.utils.store [URI]`` checks a store from the shell.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from filelock import FileLock
from filelock import Timeout as FileLockTimeout

from emonet.utils.io import ensure_writable_dir

__all__ = [
    "check_sqlite_store",
    "check_store",
    "check_store_writable",
    "default_artifact_location",
    "default_tracking_uri",
    "sqlite_lock",
    "sqlite_path",
    "without_password",
]

PACKAGE_DIR = Path(__file__).resolve().parents[1]
MLRUNS_DIRNAME = "mlruns"
DB_FILENAME = "mlflow.db"

# How long a process waits for another one to finish opening the same SQLite store.
STORE_LOCK_TIMEOUT_S = 600.0


def _repo_root(root: str | Path | None) -> Path:
    return (Path(root) if root is not None else PACKAGE_DIR.parent).resolve()


def default_tracking_uri(root: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store ``<root>/mlruns/mlflow.db``.

    Parameters
    ----------
    root : folder holding ``mlruns/``; the repository root (the parent of the
        ``emonet`` package) by default. ``mlruns/`` is created if missing.

    Returns
    -------
    str
        e.g. ``sqlite:////abs/path/mlruns/mlflow.db`` (MLflow's file store is deprecated).
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    mlruns = _repo_root(root) / MLRUNS_DIRNAME
    mlruns.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(mlruns / DB_FILENAME).as_posix()}"


def default_artifact_location(root: str | Path | None = None) -> str:
    """``<root>/mlruns/artifacts`` as an absolute ``file://`` URI (root as in :func:`default_tracking_uri`)."""
    return (_repo_root(root) / MLRUNS_DIRNAME / "artifacts").as_uri()


def without_password(uri: str) -> str:
    """``uri`` as it may be printed: a database or server URI's password replaced by ``***``."""
    parsed = urlparse(uri)
    if parsed.password is None:
        return uri
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)).geturl()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def _lock_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".lock")


@contextlib.contextmanager
def sqlite_lock(db_path: Path, timeout: float = STORE_LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive lock on ``<db>.lock`` beside a SQLite store, across processes: taken
    while a store is opened (:func:`configure_mlflow`) and while a registration decides
    and moves the champion (:mod:`emonet.tracking.registry`).

    The OS releases it when its holder dies, so a killed run never blocks the next one.
    """
    lock_path = _lock_path(db_path)
    try:
        with FileLock(lock_path, timeout=timeout):
            yield
    except FileLockTimeout:
        raise TimeoutError(f"another process held {lock_path} for more than {timeout:.0f} s") from None


SQLITE_HEADER = b"SQLite format 3\x00"


def check_sqlite_store(db_path: Path) -> None:
    """Refuse an existing file that is not an MLflow SQLite store.

    MLflow would silently create fresh tables in an empty file (losing the registry
    without a word) and fails without naming the file on a malformed one.
    """
    if not db_path.exists():
        return
    if not db_path.is_file():
        raise ValueError(f"MLflow store {db_path} is not a file")
    remedy = "restore it from a backup, or move it away to start a new, empty store"
    if db_path.stat().st_size == 0:
        raise ValueError(f"MLflow store {db_path} is empty (0 bytes), not an MLflow database: {remedy}")
    with open(db_path, "rb") as file:
        header = file.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise ValueError(f"MLflow store {db_path} is not a SQLite database: {remedy}")
    try:
        with contextlib.closing(sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True, timeout=30)) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as error:
        raise ValueError(f"MLflow store {db_path} is malformed ({error}): {remedy}") from None
    if not {"experiments", "alembic_version"} <= tables:
        raise ValueError(f"{db_path} is a SQLite database but not an MLflow store (no experiments table): {remedy}")


def check_store(uri: str) -> None:
    """Refuse a tracking or registry URI whose SQLite file is not an MLflow store.

    Called before MLflow opens the store, by every path that opens one (the flows,
    ``predict``, ``review``, ``evaluate`` and ``benchmark`` with an MLflow model URI,
    ``make serve``), whether the URI was given or came from ``MLFLOW_TRACKING_URI``.
    Other stores (a tracking server, PostgreSQL) are checked by their own servers.

    Raises
    ------
    ValueError
        One line naming the file (see :func:`check_sqlite_store`).
    """
    db_path = sqlite_path(uri)
    if db_path is not None:
        check_sqlite_store(db_path.resolve())


def check_store_writable(uri: str) -> None:
    """Refuse, before any work, a SQLite store that this process cannot write: the file
    (MLflow writes every run into it) and its folder (SQLite's journal files, the
    ``artifacts/`` folder beside it). Other stores are checked by their servers.

    Raises
    ------
    PermissionError, OSError
        One line, with the file or folder as the error's ``filename``.
    """
    db_path = sqlite_path(uri)
    if db_path is None:
        return
    db_path = db_path.resolve()
    ensure_writable_dir(db_path.parent)
    if db_path.exists():
        try:
            os.close(os.open(db_path, os.O_WRONLY | os.O_APPEND))
        except OSError as error:
            raise type(error)(error.errno, f"cannot write the MLflow store: {error.strerror}", str(db_path)) from None
    artifacts = db_path.parent / "artifacts"
    if artifacts.is_dir():
        ensure_writable_dir(artifacts)


def main(argv: list[str] | None = None) -> int:
    """``python -m emonet.utils.store [URI]``: check ``URI`` (default :func:`default_tracking_uri`)."""
    args = sys.argv[1:] if argv is None else argv
    uri = args[0] if args else default_tracking_uri()
    try:
        check_store(uri)
    except ValueError as error:
        print(f"emonet: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
