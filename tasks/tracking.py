"""Prefect tasks for the MLflow run of a flow run: opening and closing it, the data set
summary and the split inputs, and :func:`mlflow_run_of_flow`, which holds the whole
lifecycle (open, close FINISHED, FAILED on an error, KILLED on a stop) in one place.

MLflow's active run is thread-local and Prefect runs tasks in worker threads, so every
task takes the ``run_id`` and logs through an explicit ``MlflowClient``.
"""

from __future__ import annotations

import contextlib
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import pandas as pd
from mlflow.entities import DatasetInput, InputTag, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from prefect import get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import ObjectNotFound, TerminationSignal
from prefect.runtime import flow_run as current_flow_run
from prefect.tasks import exponential_backoff

from emonet.reports.evaluation import split_fingerprint
from emonet.schema import EMOTIONS
from emonet.tracking.run_logging import configure_mlflow, log_metrics
from emonet.tracking.stale_runs import FLOW_RUN_TAG, close_stale_runs, end_open_runs, end_run_with_reason, process_tags
from emonet.utils.stopping import TrainingStopped, mark_stop_handled, request_stop
from emonet.utils.store import default_tracking_uri
from tasks.report import mlflow_run_link

# The tracking server (or its SQLite file) can be briefly unavailable or locked.
TRACKING_RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2)}
# Tasks take DataFrames and clients; only the data tasks are worth caching.
NOT_CACHED = {"cache_policy": NO_CACHE}


def final_flow_run_state(flow_run_id: str) -> str | None:
    """The type of a Prefect flow run's state (``"CRASHED"``, ...) once final, else None
    (still running, or unknown to this Prefect API)."""
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(uuid.UUID(flow_run_id)).state
    except (ObjectNotFound, ValueError):
        return None
    return state.type.value if state is not None and state.is_final() else None


def crash_abandoned_flow_run(flow_run_id: str, reason: str) -> list[str]:
    """Mark CRASHED, with ``reason``, a flow run whose process is gone, its subflow runs
    (at any depth) and their task runs, wherever they are not final yet.

    A SIGKILL leaves them ``RUNNING`` for good: no hook of the killed process runs.
    Returns the names of the runs marked; none when the flow run is unknown to this
    Prefect API (it ran against another server).
    """
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.states import Crashed

    marked: list[str] = []
    with get_client(sync_client=True) as client:
        try:
            pending = [client.read_flow_run(uuid.UUID(flow_run_id))]
        except (ObjectNotFound, ValueError):
            return marked
        while pending:
            run = pending.pop()
            if run.state is not None and not run.state.is_final():
                client.set_flow_run_state(run.id, Crashed(message=reason), force=True)
                marked.append(f"flow run {run.name}")
            for task_run in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))):
                if task_run.state is not None and not task_run.state.is_final():
                    client.set_task_run_state(task_run.id, Crashed(message=reason), force=True)
                    marked.append(f"task run {task_run.name}")
            pending += client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))
            )
    return marked


@task(name="start-mlflow-run", **TRACKING_RETRIES, **NOT_CACHED)
def start_mlflow_run(
    experiment_id: str, flow_run_id: str | None, flow_run_name: str | None, params: dict[str, Any]
) -> str:
    """Close the runs that killed flow runs left RUNNING (and mark those flow runs crashed
    in Prefect), then open the MLflow run of this flow run, tagged with the Prefect flow
    run and this process, and log its parameters."""
    client = MlflowClient()
    logger = get_run_logger()
    try:
        closed_runs = close_stale_runs(client, experiment_id, final_flow_run_state)
    except Exception:  # tidying up after other flow runs must never stop this one
        logger.warning("could not look for MLflow runs left RUNNING by killed flow runs", exc_info=True)
        closed_runs = []
    for closed in closed_runs:
        logger.warning("MLflow run %s marked %s: %s", closed["run_id"], closed["status"], closed["reason"])
        if closed["abandoned_flow_run_id"]:
            try:
                marked = crash_abandoned_flow_run(closed["abandoned_flow_run_id"], closed["reason"])
            except Exception:  # as above: never stops this flow run
                logger.warning("could not mark flow run %s crashed", closed["abandoned_flow_run_id"], exc_info=True)
                continue
            if marked:
                logger.warning("marked CRASHED in Prefect: %s", ", ".join(marked))
    tags = {FLOW_RUN_TAG: str(flow_run_id), "prefect.flow_run_name": str(flow_run_name), **process_tags()}
    run = client.create_run(experiment_id, run_name=flow_run_name, tags=tags)
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in sorted(params.items())])
    client.log_dict(run_id, {key: str(value) for key, value in params.items()}, "config/flow_parameters.json")
    return run_id


@task(name="finish-mlflow-run", **TRACKING_RETRIES, **NOT_CACHED)
def finish_mlflow_run(run_id: str, status: str) -> None:
    MlflowClient().set_terminated(run_id, status=status)


def stop_reason(error: BaseException) -> str | None:
    """Why ``error`` stopped the flow, if it is a stop (SIGTERM, SIGINT) rather than a failure."""
    if isinstance(error, TrainingStopped):
        return f"stopped by {error.reason} during training"
    if isinstance(error, TerminationSignal):  # Prefect's SIGTERM bridge, outside training
        return f"stopped by {signal.Signals(error.signal).name}"
    if isinstance(error, KeyboardInterrupt):
        return "stopped by SIGINT (KeyboardInterrupt)"
    return None


@dataclass(frozen=True)
class FlowMlflowRun:
    """The MLflow run that :func:`mlflow_run_of_flow` opened for this flow run."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    @property
    def link(self) -> str | None:
        """The run's page in the MLflow UI when the store is an HTTP server, else None."""
        return mlflow_run_link(self.tracking_uri, self.experiment_id, self.run_id)


@contextlib.contextmanager
def mlflow_run_of_flow(
    *, tracking_uri: str | None, experiment_name: str, params: dict[str, Any]
) -> Iterator[FlowMlflowRun]:
    """The MLflow run of the current flow run, from opening to closing.

    Opens it (closing the runs killed flow runs left RUNNING) with ``params``, and ends it
    ``FINISHED`` when the block completes, ``FAILED`` when it raises, or ``KILLED`` with the
    reason when a SIGTERM/SIGINT stopped it (the stop is then requested for the rest of the
    process, see :mod:`emonet.utils.stopping`). Crashes and cancellations, where no
    ``except`` runs, are the flow's hooks' (:func:`end_mlflow_run_of_flow_run`).
    """
    experiment_id = configure_mlflow(tracking_uri=tracking_uri, experiment_name=experiment_name)
    run_id = start_mlflow_run(
        experiment_id=experiment_id,
        flow_run_id=current_flow_run.id,
        flow_run_name=current_flow_run.name,
        params=params,
    )
    try:
        yield FlowMlflowRun(run_id=run_id, experiment_id=experiment_id, tracking_uri=mlflow.get_tracking_uri())
    except BaseException as error:
        reason = stop_reason(error)
        if reason is None:
            finish_mlflow_run(run_id=run_id, status="FAILED")
        else:
            request_stop(reason)  # already requested if training stopped; see flows.training_pipeline.main
            # Not through a task: the same signal may have stopped Prefect's API server.
            end_run_with_reason(MlflowClient(), run_id, "KILLED", reason)
            mark_stop_handled()  # see flows.training_pipeline._exit_after_stop
        raise
    finish_mlflow_run(run_id=run_id, status="FINISHED")


def end_mlflow_run_of_flow_run(flow: Any, flow_run: Any, state: Any) -> None:
    """Crash and cancellation hook: the flow's own `except` never runs then, so the
    MLflow run of this flow run is ended here, KILLED, with the state as the reason."""
    uri = flow_run.parameters.get("tracking_uri") or default_tracking_uri()
    reason = f"Prefect flow run {flow_run.id} ended {state.name}: {state.message or 'no message'}"
    end_open_runs(MlflowClient(tracking_uri=uri, registry_uri=uri), str(flow_run.id), "KILLED", reason)


@task(name="log-dataset-summary", **TRACKING_RETRIES, **NOT_CACHED)
def log_dataset_summary(
    run_id: str,
    frames: dict[str, pd.DataFrame],
    counts: dict[str, dict[str, int]],
    visibility: dict[str, dict[str, Any]],
    visibility_dir: Path,
) -> None:
    """Rows per split, rows dropped and why, emotion prevalence and face visibility."""
    client = MlflowClient()
    for split, split_counts in counts.items():
        log_metrics(client, run_id, split_counts, prefix=f"data_{split}_")
        log_metrics(client, run_id, visibility[split], prefix=f"data_{split}_visibility_")
    prevalence = pd.DataFrame({split: df[list(EMOTIONS)].mean() for split, df in frames.items()})
    prevalence.index.name = "emotion"
    client.log_table(run_id, data=prevalence.reset_index(), artifact_file="dataset/emotion_prevalence.json")
    client.log_dict(run_id, {"counts": counts, "visibility": visibility}, "dataset/summary.json")
    client.log_artifact(run_id, str(Path(visibility_dir) / "face_visibility.png"), "dataset")


@task(name="log-split-inputs", **TRACKING_RETRIES, **NOT_CACHED)
def log_split_inputs(run_id: str, frames: dict[str, pd.DataFrame], csv_paths: dict[str, Path]) -> None:
    """The train, val and test CSVs as the run's dataset inputs (MLflow's run page lists
    them), each with its split fingerprint as the digest. ``frames`` are the splits as
    written to ``csv_paths``, already in memory."""
    inputs = []
    for split, csv_path in csv_paths.items():
        frame = frames[split]
        dataset = mlflow.data.from_pandas(
            frame, source=str(Path(csv_path).resolve()), name=f"emotic-{split}", digest=split_fingerprint(frame)[:16]
        )
        tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=split)]
        inputs.append(DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags))
    MlflowClient().log_inputs(run_id, datasets=inputs)
