"""Prefect tasks for the model half of the pipeline: MLflow run bookkeeping, training,
evaluation and registration.

MLflow's active run is thread-local and Prefect runs tasks in worker threads, so every
task takes the ``run_id`` and logs through an explicit ``MlflowClient``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from emonet.config import EmoNetConfig, config_to_dict
from emonet.distributed import launch_training
from emonet.evaluation import evaluate_checkpoint, split_fingerprint
from emonet.normalize import AffectNormalizer
from emonet.review import review_predictions_with_visualization
from emonet.schema import EMOTIONS
from emonet.tracking import log_emonet_model, promote_model
from emonet.train import train_from_csvs

# The tracking server (or its SQLite file) can be briefly unavailable or locked.
TRACKING_RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2)}
# Tasks take DataFrames and clients; only the data tasks are worth caching.
NOT_CACHED = {"cache_policy": NO_CACHE}


def _log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0, prefix: str = "") -> None:
    finite = [
        Metric(key=f"{prefix}{key}", value=float(value), timestamp=0, step=step)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and math.isfinite(value)
    ]
    client.log_batch(run_id, metrics=finite)


@task(name="start-mlflow-run", **TRACKING_RETRIES, **NOT_CACHED)
def start_mlflow_run(experiment_id: str, flow_run_id: str | None, flow_run_name: str | None, params: dict[str, Any]) -> str:
    """Open the MLflow run of this flow run, tagged with the Prefect flow run, and log its parameters."""
    client = MlflowClient()
    tags = {"prefect.flow_run_id": str(flow_run_id), "prefect.flow_run_name": str(flow_run_name)}
    run = client.create_run(experiment_id, run_name=flow_run_name, tags=tags)
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in sorted(params.items())])
    client.log_dict(run_id, {key: str(value) for key, value in params.items()}, "config/flow_parameters.json")
    return run_id


@task(name="finish-mlflow-run", **TRACKING_RETRIES, **NOT_CACHED)
def finish_mlflow_run(run_id: str, status: str) -> None:
    MlflowClient().set_terminated(run_id, status=status)


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
        _log_metrics(client, run_id, split_counts, prefix=f"data_{split}_")
        _log_metrics(client, run_id, visibility[split], prefix=f"data_{split}_visibility_")
    prevalence = pd.DataFrame({split: df[list(EMOTIONS)].mean() for split, df in frames.items()})
    prevalence.index.name = "emotion"
    client.log_table(run_id, data=prevalence.reset_index(), artifact_file="dataset/emotion_prevalence.json")
    client.log_dict(run_id, {"counts": counts, "visibility": visibility}, "dataset/summary.json")
    client.log_artifact(run_id, str(Path(visibility_dir) / "face_visibility.png"), "dataset")


@task(name="train-model", retries=1, retry_delay_seconds=5, **NOT_CACHED)
def train_model(
    run_id: str,
    train_csv: Path,
    val_csv: Path,
    img_dir: Path,
    checkpoint_dir: Path,
    normalization_json: Path,
    model: dict[str, Any],
    loss: dict[str, Any],
    train: dict[str, Any],
) -> dict[str, Any]:
    """Train with per-epoch MLflow logging; a retry resumes from the last checkpoint.

    With ``train.distributed`` above one process, ``torchrun`` runs the training as a
    subprocess: its output streams into this task's log, rank 0 logs the epochs to the
    MLflow run itself, and a failed rank fails the task.
    """
    logger = get_run_logger()
    config = EmoNetConfig.model_validate({"model": model, "loss": loss, "train": train})
    client = MlflowClient()
    client.log_dict(run_id, config_to_dict(config), "config/emonet_config.yaml")

    def log_epoch(metrics: dict[str, float]) -> None:
        _log_metrics(client, run_id, metrics, step=int(metrics["epoch"]))
        logger.info(
            "epoch %d: train loss %.4f, val mAP %.4f", metrics["epoch"], metrics["train_loss"], metrics["val_mAP"]
        )

    last = Path(checkpoint_dir) / "last.pt"
    resume_from = last if last.is_file() else None
    if resume_from is not None:
        logger.info("resuming from %s", resume_from)
    distributed = config.train.distributed
    if distributed.enabled:
        client.log_param(run_id, "effective_batch_size", config.train.batch_size * distributed.world_size)
        result = launch_training(
            config, train_csv, val_csv, img_dir, checkpoint_dir,
            resume_from=resume_from, normalization_json=normalization_json, mlflow_run_id=run_id,
            on_line=logger.info,
        )
    else:
        normalizer = AffectNormalizer.load(normalization_json)
        result = train_from_csvs(
            train_csv, val_csv, img_dir, config, checkpoint_dir,
            callbacks=[log_epoch],
            resume_from=resume_from,
            # The 1..10 validation errors need the bounds the targets were normalized with.
            affect_bounds=(normalizer.low, normalizer.high),
        )
    client.log_artifact(run_id, str(result.best_checkpoint), "checkpoints")
    client.log_metric(run_id, "best_val_mAP", result.best_metric)
    client.log_metric(run_id, "best_epoch", result.best_epoch)
    return {
        "best_checkpoint": result.best_checkpoint,
        "best_val_mAP": result.best_metric,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
    }


@task(name="evaluate-model", **TRACKING_RETRIES, **NOT_CACHED)
def evaluate_model(
    run_id: str, checkpoint: Path, test_csv: Path, img_dir: Path, normalization_json: Path, out_dir: Path
) -> dict[str, Any]:
    """Test metrics, the per-emotion table and the figures, logged to the run."""
    test = pd.read_csv(test_csv)
    report = evaluate_checkpoint(checkpoint, test, img_dir, out_dir, normalizer=AffectNormalizer.load(normalization_json))
    client = MlflowClient()
    _log_metrics(client, run_id, report.metrics, prefix="test_")
    _log_metrics(client, run_id, report.metrics_at_half, prefix="test_at_0.5_")
    client.log_table(run_id, data=report.per_emotion.reset_index(), artifact_file="evaluation/per_emotion.json")
    for path in report.files.values():
        client.log_artifact(run_id, str(path), "evaluation")
    return {"metrics": report.metrics, "test_split": split_fingerprint(test), "files": report.files}


@task(name="review-predictions", **TRACKING_RETRIES, **NOT_CACHED)
def review_model(
    run_id: str, checkpoint: Path, test_csv: Path, img_dir: Path, normalization_json: Path, out_dir: Path,
    num_samples: int = 24, detailed_samples: int = 6,
) -> Path:
    """The visual review of the test split (worst predictions first); the grid, a few
    detailed pages and the HTML index go to the run's ``review/`` artifacts."""
    review_predictions_with_visualization(
        checkpoint,
        test_csv,
        img_dir,
        out_dir,
        num_samples=num_samples,
        detailed_samples=detailed_samples,
        sort_by="worst",
        normalizer=normalization_json,
        progress=False,
    )
    MlflowClient().log_artifacts(run_id, str(out_dir), "review")
    return Path(out_dir) / "index.html"


@task(name="register-model", **TRACKING_RETRIES, **NOT_CACHED)
def register_model(
    run_id: str,
    checkpoint: Path,
    normalization_json: Path,
    test_map: float,
    test_split: str,
    registered_model_name: str,
) -> dict[str, Any]:
    """Log the pyfunc model, register a version, and move `champion` only on improvement."""
    version = log_emonet_model(run_id, checkpoint, normalization_json, registered_model_name=registered_model_name)
    decision = promote_model(MlflowClient(), registered_model_name, version.version, test_map, test_split, run_id)
    get_run_logger().info("%s version %s: %s", registered_model_name, version.version, decision["decision"])
    return {"version": str(version.version), **decision}
