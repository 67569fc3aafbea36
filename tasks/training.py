"""Prefect task for the training step: per-epoch MLflow logging and a progress artifact,
in this process or under ``torchrun``, resuming from the last checkpoint on a retry."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task

from emonet.config import EmoNetConfig, config_to_dict
from emonet.data.normalize import AffectNormalizer
from emonet.tracking.run_logging import log_metrics
from emonet.training.launcher import launch_training
from emonet.training.trainer import FitResult, train_from_csvs
from emonet.utils.stopping import stop_on_signals, stop_requested
from tasks.report import EpochProgress
from tasks.tracking import NOT_CACHED


@task(name="train-model", retries=1, retry_delay_seconds=5, **NOT_CACHED)
def train_model(
    *,
    run_id: str,
    config: EmoNetConfig,
    train_csv: Path,
    val_csv: Path,
    img_dir: Path,
    checkpoint_dir: Path,
    normalization_json: Path,
) -> FitResult:
    """Train with per-epoch MLflow logging; a retry resumes from the last checkpoint.

    With ``train.distributed`` above one process, ``torchrun`` runs the training as a
    subprocess: its output streams into this task's log, rank 0 logs the epochs to the
    MLflow run itself, and a failed rank fails the task.

    In this process, SIGTERM or SIGINT stops training at the next batch
    (:mod:`emonet.utils.stopping`): the task raises ``TrainingStopped``, which Prefect does not
    retry, and ``last.pt`` holds the last completed epoch.
    """
    logger = get_run_logger()
    client = MlflowClient()
    client.log_dict(run_id, config_to_dict(config), "config/emonet_config.yaml")

    def log_epoch(metrics: dict[str, float]) -> None:
        log_metrics(client, run_id, metrics, step=int(metrics["epoch"]))
        logger.info(
            "epoch %d: train loss %.4f, val mAP %.4f", metrics["epoch"], metrics["train_loss"], metrics["val_mAP"]
        )

    last = Path(checkpoint_dir) / "last.pt"
    resume_from = last if last.is_file() else None
    if resume_from is not None:
        logger.info("resuming from %s", resume_from)
    epoch_progress = EpochProgress(config.train.epochs)

    def progress(metrics: dict[str, float]) -> None:
        # Once a stop is requested, Prefect's API server may be gone (the same SIGTERM
        # stops the ephemeral one) and its client would retry for a minute per call.
        if stop_requested() is None:
            epoch_progress(metrics)

    distributed = config.train.distributed
    if distributed.enabled:
        client.log_param(run_id, "effective_batch_size", config.train.batch_size * distributed.world_size)
        result = launch_training(
            config,
            train_csv,
            val_csv,
            img_dir,
            checkpoint_dir,
            resume_from=resume_from,
            normalization_json=normalization_json,
            mlflow_run_id=run_id,
            on_line=logger.info,
        )
        # The epochs ran in torchrun's processes, which log them to MLflow themselves.
        for metrics in result.history[-1:]:
            progress(metrics)
    else:
        normalizer = AffectNormalizer.load(normalization_json)
        # SIGTERM/SIGINT stop training at the next batch (TrainingStopped, never retried)
        # instead of Prefect's SIGTERM bridge raising wherever the signal lands.
        with stop_on_signals():
            result = train_from_csvs(
                train_csv,
                val_csv,
                img_dir,
                config,
                checkpoint_dir,
                callbacks=[log_epoch, progress],
                resume_from=resume_from,
                # The 1..10 validation errors need the bounds the targets were normalized with.
                affect_bounds=(normalizer.low, normalizer.high),
            )
    client.log_artifact(run_id, str(result.best_checkpoint), "checkpoints")
    client.log_metric(run_id, "best_val_mAP", result.best_metric)
    client.log_metric(run_id, "best_epoch", result.best_epoch)
    return result
