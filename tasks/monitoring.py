"""Prefect tasks of the monitoring flow: a thin wrapper over
:func:`emonet.monitoring.monitor.monitor_batch`, the Prefect events that close the loop to
retraining, and the run's markdown artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.tasks import exponential_backoff

from emonet.monitoring.batches import batch_label
from emonet.monitoring.monitor import MonitoringResult, monitor_batch
from tasks.predict import retry_transient

DRIFT_EVENT = "emonet.monitoring.drift-detected"
DEGRADED_EVENT = "emonet.monitoring.performance-degraded"
MONITORING_ARTIFACT_KEY = "emonet-monitoring"


def model_resource_id(model_name: str) -> str:
    """The Prefect resource of a registered model, which the retraining trigger matches."""
    return f"emonet.model.{model_name}"


def _monitor_run_name(parameters: dict[str, Any]) -> str:
    """``monitor-shifted/batch.csv``: the batch's label, which names a ``batch.csv`` by its folder."""
    return f"monitor-{batch_label(parameters['batch'])}"


@task(
    name="monitor-batch",
    task_run_name=_monitor_run_name,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=retry_transient,
    # A batch is monitored once per content and version: the MLflow run is the record
    # (monitor_batch finds it), not a Prefect result keyed on a path.
    cache_policy=NO_CACHE,
)
def monitor_batch_task(batch: Path, model_uri: str, **options: Any) -> MonitoringResult:
    """Monitor one batch (:func:`emonet.monitoring.monitor.monitor_batch`); log the decision."""
    result = monitor_batch(batch, model_uri, **options)
    logger = get_run_logger()
    reused = " (monitored before: the recorded result)" if result.reused else ""
    logger.info("%s: %s%s; MLflow run %s", batch, result.decision, reused, result.run_id)
    return result


@task(name="emit-monitoring-events", cache_policy=NO_CACHE)
def emit_monitoring_events(result: MonitoringResult) -> list[str]:
    """``emonet.monitoring.drift-detected`` and/or ``...performance-degraded`` for a new
    finding, on the registered model's resource (a reused result was announced when found)."""
    if result.reused:
        return []
    names = [DRIFT_EVENT] if result.drift_detected else []
    names += [DEGRADED_EVENT] if result.performance_degraded else []
    resource = {
        "prefect.resource.id": model_resource_id(result.model_name),
        "prefect.resource.name": result.model_name,
        "emonet.model.version": result.model_version,
    }
    payload = {
        "model_name": result.model_name,
        "model_version": result.model_version,
        "batch": result.batch,
        "batch_fingerprint": result.fingerprint,
        "drifted_share": result.drifted_share,
        "drifted": result.drifted,
        "most_moved": result.most_moved,
        "performance": result.performance,
        "mlflow_run_id": result.run_id,
    }
    for name in names:
        emit_event(event=name, resource=resource, payload=payload)
        get_run_logger().info("emitted %s for %s version %s", name, result.model_name, result.model_version)
    return names


@task(name="publish-monitoring", cache_policy=NO_CACHE)
def publish_monitoring(results: list[MonitoringResult]) -> str:
    """The run's markdown artifact: each batch's decision and per-signal table."""
    flagged = sum(result.drift_detected or bool(result.performance_degraded) for result in results)
    markdown = "# EmoNet monitoring\n\n" + "\n".join(result.markdown for result in results)
    artifact_id = create_markdown_artifact(
        markdown=markdown,
        key=MONITORING_ARTIFACT_KEY,
        description=f"{len(results)} batches monitored, {flagged} flagged",
    )
    return str(artifact_id)


@task(name="store-monitoring-reference", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def store_monitoring_reference(*, registered_model_name: str, version: str, val_csv: Path, img_dir: Path) -> str | None:
    """The new version's monitoring reference, on its validation split, stored with it
    (:func:`emonet.monitoring.reference.ensure_reference`). A failure is logged, not
    raised: the version stays registered, and its first monitoring computes the reference."""
    from mlflow import MlflowClient

    from emonet.monitoring.monitor import load_monitoring_predictor
    from emonet.monitoring.reference import ensure_reference

    client = MlflowClient()
    model_version = client.get_model_version(registered_model_name, version)
    try:
        reference = ensure_reference(
            client, model_version, load_monitoring_predictor(model_version), split_csv=val_csv, img_dir=img_dir
        )
    except (OSError, ValueError, RuntimeError) as error:
        get_run_logger().warning(
            "%s version %s: no monitoring reference stored (%s); its first monitoring computes it",
            registered_model_name,
            version,
            error,
        )
        return None
    return f"{len(reference)} validation crops"
