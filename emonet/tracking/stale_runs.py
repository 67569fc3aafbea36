"""MLflow runs left ``RUNNING`` by a flow that was killed or crashed: the tags naming the
process that owns a run, and closing the runs whose owner is gone."""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable, Sequence

import psutil
from mlflow import MlflowClient
from mlflow.entities import Run

logger = logging.getLogger(__name__)

__all__ = [
    "END_REASON_TAG",
    "FLOW_RUN_TAG",
    "HOST_TAG",
    "PID_TAG",
    "PROCESS_START_TAG",
    "close_stale_runs",
    "end_open_runs",
    "end_run_with_reason",
    "process_tags",
]

# Run tags naming the process that owns a run, so that a later run can tell that a run
# left RUNNING belongs to a process that is gone (killed, or crashed before closing it).
FLOW_RUN_TAG = "prefect.flow_run_id"
HOST_TAG = "emonet.host"
PID_TAG = "emonet.pid"
PROCESS_START_TAG = "emonet.process_start"
END_REASON_TAG = "emonet.end_reason"  # why a run was ended by someone other than its owner


def process_tags() -> dict[str, str]:
    """Run tags naming this process (host, pid, start time), for :func:`close_stale_runs`."""
    process = psutil.Process()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(process.pid), PROCESS_START_TAG: repr(process.create_time())}


def _owner_gone(tags: dict[str, str]) -> bool:
    """Whether the process named by a run's :func:`process_tags` has ended.

    Only known on the same host; the start time tells a reused pid from the owner.
    """
    if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
        return False
    try:
        started = psutil.Process(int(tags[PID_TAG])).create_time()
    except psutil.NoSuchProcess:
        return True
    except (ValueError, psutil.Error):  # a malformed tag, or a process we may not inspect
        return False
    try:
        recorded = float(tags.get(PROCESS_START_TAG, "nan"))
    except ValueError:  # a malformed tag: the owner cannot be told apart
        return False
    return math.isfinite(recorded) and abs(started - recorded) > 1.0


def end_run_with_reason(client: MlflowClient, run_id: str, status: str, reason: str) -> None:
    """End a run someone else left open: ``status`` (``KILLED``/``FAILED``) and the tag ``emonet.end_reason``."""
    client.set_tag(run_id, END_REASON_TAG, reason)
    client.set_terminated(run_id, status=status)
    logger.warning("marked MLflow run %s %s: %s", run_id, status, reason)


def _running_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Run]:
    runs: list[Run] = []
    page_token = None
    while True:
        page = client.search_runs(
            experiment_ids, f"attributes.status = 'RUNNING'{filter_string}", max_results=1000, page_token=page_token
        )
        runs += list(page)
        page_token = page.token
        if not page_token:
            return runs


def close_stale_runs(
    client: MlflowClient,
    experiment_id: str,
    final_state_of: Callable[[str], str | None],
    keep: Sequence[str] = (),
) -> list[dict[str, str]]:
    """End the runs of an experiment left ``RUNNING`` by flows that were killed or crashed.

    A run is stale when its Prefect flow run (tag ``prefect.flow_run_id``) has ended
    (``final_state_of`` returns the final state's name: ``KILLED`` for ``CANCELLED`` and
    ``CRASHED``, else ``FAILED``), or when its process (:func:`process_tags`) ran on
    this host and is gone (``KILLED``: a SIGKILL leaves the flow run itself ``RUNNING``).
    Runs of live processes and of unknown owners (another host, no tags) are kept.

    Parameters
    ----------
    client : an ``MlflowClient`` on the tracking store.
    experiment_id : the experiment to look in.
    final_state_of : a flow run id -> its final state's type (``"COMPLETED"``,
        ``"FAILED"``, ``"CRASHED"``, ``"CANCELLED"``), or None while it runs or when unknown.
    keep : run ids never to close (the caller's own).

    Returns
    -------
    list of dict
        ``run_id``, ``status`` and ``reason`` of every run closed (tagged ``emonet.end_reason``),
        and ``abandoned_flow_run_id``: the Prefect flow run of a run closed because its
        process is gone (that flow run is left ``RUNNING`` too), else ``""``.
    """
    closed = []
    for run in _running_runs(client, [experiment_id], ""):
        if run.info.run_id in keep:
            continue
        tags = run.data.tags
        flow_run_id = tags.get(FLOW_RUN_TAG)
        if flow_run_id == "None":  # a run opened outside a flow run
            flow_run_id = None
        state = final_state_of(flow_run_id) if flow_run_id else None
        if state is not None:
            status = "KILLED" if state in ("CANCELLED", "CRASHED") else "FAILED"
            reason = f"Prefect flow run {flow_run_id} ended ({state}) without closing its MLflow run"
        elif _owner_gone(tags):
            status = "KILLED"
            reason = (
                f"process {tags[PID_TAG]} on {tags[HOST_TAG]} ended (killed or crashed) without closing its MLflow run"
            )
        else:
            continue
        end_run_with_reason(client, run.info.run_id, status, reason)
        closed.append(
            {
                "run_id": run.info.run_id,
                "status": status,
                "reason": reason,
                # Set where the flow run is not known to have ended: its process is gone, so
                # it stays RUNNING in Prefect unless the caller marks it crashed.
                "abandoned_flow_run_id": flow_run_id if state is None and flow_run_id else "",
            }
        )
    return closed


def end_open_runs(client: MlflowClient, flow_run_id: str, status: str, reason: str) -> list[str]:
    """End the ``RUNNING`` runs of a Prefect flow run (tag ``prefect.flow_run_id``), in any experiment.

    For a flow's crash and cancellation hooks, which run when no ``finally`` block does.
    Returns the ids of the runs ended.
    """
    experiment_ids = [experiment.experiment_id for experiment in client.search_experiments()]
    if not experiment_ids:
        return []
    runs = _running_runs(client, experiment_ids, f" and tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'")
    for run in runs:
        end_run_with_reason(client, run.info.run_id, status, reason)
    return [run.info.run_id for run in runs]
