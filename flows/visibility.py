"""Face visibility shards on a Dask cluster: a subflow whose task runner is prefect-dask's
``DaskTaskRunner``, started by ``prepare_data`` when its ``dask_address`` is set.

Each Dask worker process scores whole shards with one Face Mesh that it keeps for every
shard it is sent (``emonet.visibility.thread_scorer``); shards are cached exactly as on
the local path, so a rerun on either path reuses them.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect_dask import DaskTaskRunner

from emonet.visibility import default_workers
from tasks.data import score_visibility_shard

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
    if dask_address == "local":
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": default_workers(),
                # Face Mesh runs single-threaded: one process per core uses every core
                # without two Face Mesh graphs sharing a process.
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
    return [future.result() for future in futures]


def score_visibility_on_dask(
    shards: list[tuple[Path, int, int]], img_dir: Path, dask_address: str
) -> list[list[float]]:
    """Run :func:`score_shards_on_dask` on the cluster that ``dask_address`` names."""
    return score_shards_on_dask.with_options(task_runner=dask_task_runner(dask_address))(shards, img_dir)
