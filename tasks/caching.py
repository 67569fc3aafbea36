"""Cache keys that follow file contents, not file names.

Prefect hashes a ``Path`` argument by its string, so a task keyed on its inputs alone
would return a stale result after the file behind the path changed. These policies add
a fingerprint of the files themselves: CSVs by content (they are small), image arrays
by size and modification time (hashing gigabytes of pixels would cost more than the
work it saves), and the source of every library module whose code shapes the result.

A cached result is checked before it is used (:func:`checked_result`): one that unpickles
but is wrong (a shard with fewer scores than rows, say) is recomputed, and the entry named
in a warning is replaced. Where the entries live and how to clear them:
``docs/reliability.md``.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import Task, get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy, CachePolicy
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect.states import State

# The library modules whose code shapes each cached result, directly or through the
# rows and arrays it reads: the scoring or normalization itself, row validation
# (emonet.data.annotations), the affect scale map (emonet.affect), array reading and its
# checks (emonet.data.arrays) and the column names and scales (emonet.schema). TASK_SOURCE
# covers only the task's own body. Add a module here
# when a cached task starts to depend on it.
VISIBILITY_MODULES: tuple[str, ...] = (
    "emonet.data.face_visibility",
    "emonet.data.arrays",
    "emonet.data.annotations",
    "emonet.schema",
)
NORMALIZE_MODULES: tuple[str, ...] = (
    "emonet.data.normalize",
    "emonet.affect",
    "emonet.data.annotations",
    "emonet.data.arrays",
    "emonet.schema",
)


def content_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stat_digest(paths: Iterable[Path]) -> str:
    """Digest of each file's name, size and modification time (missing files included)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        except FileNotFoundError:
            digest.update(f"{path.name}:missing;".encode())
    return digest.hexdigest()


def module_digest(module_name: str) -> str:
    """SHA-256 of the source file of an importable module (imported if needed)."""
    source = getattr(importlib.import_module(module_name), "__file__", None)
    if source is None or not source.endswith(".py"):
        raise ValueError(f"module {module_name!r} has no source file to fingerprint")
    return content_digest(source)


def code_digest(module_names: Iterable[str]) -> str:
    """One digest of the sources of ``module_names``, in the order given."""
    digest = hashlib.sha256()
    for name in module_names:
        digest.update(f"{name}:{module_digest(name)};".encode())
    return digest.hexdigest()


def _visibility_shard_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    csv_path = Path(parameters["annotations_csv"])
    img_dir = Path(parameters["img_dir"])
    names = pd.read_csv(csv_path, usecols=["Crop_name"])["Crop_name"].iloc[parameters["start"] : parameters["stop"]]
    return (
        code_digest(VISIBILITY_MODULES) + content_digest(csv_path) + stat_digest(img_dir / str(name) for name in names)
    )


def _csv_contents_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Contents of every CSV passed in ``csv_paths`` (a split -> path mapping)."""
    csv_paths = sorted(parameters["csv_paths"].items())
    parts = [code_digest(NORMALIZE_MODULES)] + [f"{split}:{content_digest(path)}" for split, path in csv_paths]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


# Inputs minus what cannot change the result (worker counts), the task's own source,
# and the files behind the path arguments.
VISIBILITY_SHARD_CACHE: CachePolicy = (
    TASK_SOURCE + (INPUTS - "workers") + CacheKeyFnPolicy(cache_key_fn=_visibility_shard_key)
)
CSV_CONTENTS_CACHE: CachePolicy = TASK_SOURCE + INPUTS + CacheKeyFnPolicy(cache_key_fn=_csv_contents_key)


def cache_entry(state: State) -> str:
    """Where a task run's persisted result is stored (the file, for local storage)."""
    metadata = getattr(state.data, "metadata", None)
    return str(getattr(metadata, "storage_key", None) or "an entry of Prefect's result storage")


def checked_result(
    run: PrefectFuture | State,
    check: Callable[[Any], str | None],
    task: Task,
    /,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """The result of a task run (``run``: its future, or its state from
    ``return_state=True``), checked with ``check`` before it is used.

    ``check`` returns what is wrong with a result, or None. A cached result that fails is
    treated as a cache miss: the warning names the cache entry, and ``task`` runs again
    on ``*args``/``**kwargs`` with ``refresh_cache``, which replaces the entry. A result
    that was not cached and fails is a bug, not a stale cache, and raises.

    Raises
    ------
    ValueError
        A freshly computed result (or the recomputed one) fails ``check``.
    """
    if isinstance(run, PrefectFuture):
        run.wait()
        run = run.state
    value = run.result()
    problem = check(value)
    if problem is None:
        return value
    if run.name != "Cached":
        raise ValueError(f"task {task.name} returned a result that is not valid: {problem}")
    get_run_logger().warning(
        "the cached result of %s at %s is not valid (%s): recomputing it and replacing the entry",
        task.name,
        cache_entry(run),
        problem,
    )
    # submit, not a call: on a Dask task runner the work stays on the cluster.
    value = task.with_options(refresh_cache=True).submit(*args, **kwargs).result()
    problem = check(value)
    if problem is not None:
        raise ValueError(f"task {task.name} returned a result that is not valid: {problem}")
    return value
