"""Face visibility of every split, shard by shard: :func:`score_visibility` batches the
cached shard tasks on this machine's process pool, or hands them to a Dask cluster (a
subflow whose task runner is prefect-dask's ``DaskTaskRunner``) when ``dask_address`` is set.

Each Dask worker process scores whole shards with one face landmarker that it keeps for every
shard it is sent (``emonet.data.face_visibility.thread_scorer``); shards are cached exactly as on
the local path, so a rerun on either path reuses them.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from prefect import flow
from prefect.futures import PrefectFuture

from emonet.data.face_visibility import default_workers
from emonet.schema import SPLITS, annotations_path, arrays_dir
from tasks.caching import checked_result
from tasks.data import score_visibility_shard, shard_bounds, shard_scores_problem

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner

# Schemes of the distributed scheduler's own protocols that a worker on another
# machine can reach.
_SCHEDULER_SCHEMES = ("tcp", "tls")


def dask_task_runner(dask_address: str) -> DaskTaskRunner:
    """The task runner that ``dask_address`` names.

    Parameters
    ----------
    dask_address : ``"local"`` starts a ``distributed.LocalCluster`` on this machine
        for the run (one single-threaded worker process per available core, bound to
        127.0.0.1, dashboard at http://127.0.0.1:8787 or a free port); otherwise the
        address of a running scheduler, e.g. ``tcp://10.0.0.5:8786``.

    Raises
    ------
    ValueError : the address is not ``local`` nor ``[tcp|tls://]host:port``.
    """
    # Imported here: prefect_dask (with dask and distributed) takes about 0.6 s to
    # import, which every run of the training flow would pay without using Dask.
    from prefect_dask import DaskTaskRunner

    if dask_address == "local":
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": default_workers(),
                # The landmarker computes on one core: one process per core uses every core
                # without two landmarker graphs sharing a process.
                "threads_per_worker": 1,
                "processes": True,
                "host": "127.0.0.1",
                "dashboard_address": "127.0.0.1:8787",
            },
        )
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(dask_address, strict=False)
        parse_host_port(location)
    except ValueError as err:
        raise ValueError(
            f"dask_address must be 'local' or a scheduler address such as tcp://host:8786, got {dask_address!r} ({err})"
        ) from None
    if scheme not in _SCHEDULER_SCHEMES:
        raise ValueError(f"dask_address must use one of {_SCHEDULER_SCHEMES}, got {dask_address!r}")
    return DaskTaskRunner(address=dask_address)


@flow(name="emonet-face-visibility-dask")
def score_shards_on_dask(shards: list[tuple[Path, int, int]], img_dir: Path) -> list[list[float]]:
    """Scores of every ``(annotations_csv, start, stop)`` shard, in the order given.

    Every shard is submitted at once: the scheduler hands them to idle workers, and
    each worker scores its shard in its own process (``workers=1``; the cluster's
    processes are the parallelism).
    """
    futures = [score_visibility_shard.submit(csv_path, img_dir, start, stop, 1) for csv_path, start, stop in shards]
    return [
        checked_shard(future, csv_path, img_dir, start, stop, 1)
        for future, (csv_path, start, stop) in zip(futures, shards)
    ]


def checked_shard(
    future: PrefectFuture, csv_path: Path, img_dir: Path, start: int, stop: int, workers: int | None
) -> list[float]:
    """A shard's scores, from the cache or computed; a cached entry that does not hold
    one score per row is recomputed and replaced (:func:`tasks.caching.checked_result`)."""
    check = functools.partial(shard_scores_problem, start=start, stop=stop)
    return checked_result(future, check, score_visibility_shard, csv_path, img_dir, start, stop, workers)


@contextlib.contextmanager
def restored_environment() -> Iterator[None]:
    """Restore this process's environment afterwards: a LocalCluster's nannies run in this
    process and set ``OMP_NUM_THREADS=1`` (and MKL's, OpenBLAS's, MALLOC_TRIM_THRESHOLD_)
    in its ``os.environ`` before spawning their workers (Dask's ``pre-spawn-environ``),
    which every later subprocess of the flow (torchrun, a scoring server) would inherit."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)


def score_visibility_on_dask(
    shards: list[tuple[Path, int, int]], img_dir: Path, dask_address: str
) -> list[list[float]]:
    """Run :func:`score_shards_on_dask` on the cluster that ``dask_address`` names."""
    with restored_environment():
        return score_shards_on_dask.with_options(task_runner=dask_task_runner(dask_address))(shards, img_dir)


def score_visibility(
    data_root: Path,
    *,
    shard_size: int,
    workers: int | None,
    parallel_shards: int,
    dask_address: str = "",
) -> dict[str, list[float]]:
    """Face visibility of every row of every split of the archive at ``data_root``.

    Parameters
    ----------
    data_root : the archive root (``annots_arrs/`` and ``img_arrs/``).
    shard_size : rows per cached shard (:func:`tasks.data.score_visibility_shard`).
    workers : face-landmarker processes per shard on this machine (None: all cores).
    parallel_shards : shards scored at the same time on this machine; each already
        uses ``workers`` processes, so the product is what the machine must hold.
    dask_address : empty for this machine; else ``local`` or a scheduler address
        (:func:`dask_task_runner`), where ``workers`` and ``parallel_shards`` do not apply.

    Returns
    -------
    dict
        Split -> the scores of its rows, in row order.
    """
    img_dir = arrays_dir(data_root)
    shards = []
    for split in SPLITS:
        csv_path = annotations_path(data_root, split)
        n_rows = len(pd.read_csv(csv_path, usecols=["Crop_name"]))
        shards += [(split, csv_path, start, stop) for start, stop in shard_bounds(n_rows, shard_size)]
    scores: dict[str, list[float]] = {split: [] for split in SPLITS}
    if dask_address:
        shard_scores = score_visibility_on_dask([shard[1:] for shard in shards], img_dir, dask_address)
        for (split, *_), values in zip(shards, shard_scores):
            scores[split] += values
        return scores
    # Each shard already uses `workers` processes: `parallel_shards` at a time keep the
    # machine from being oversubscribed (on a cluster runner, raise it).
    for wave_start in range(0, len(shards), parallel_shards):
        wave = shards[wave_start : wave_start + parallel_shards]
        futures = [
            score_visibility_shard.submit(csv_path, img_dir, start, stop, workers) for _, csv_path, start, stop in wave
        ]
        for (split, csv_path, start, stop), future in zip(wave, futures):
            scores[split] += checked_shard(future, csv_path, img_dir, start, stop, workers)
    return scores
