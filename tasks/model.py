"""Prefect tasks for the model half of the pipeline: MLflow run bookkeeping, training,
evaluation and registration.

MLflow's active run is thread-local and Prefect runs tasks in worker threads, so every
task takes the ``run_id`` and logs through an explicit ``MlflowClient``. The model tasks
take and return the library's own types (:class:`~emonet.config.EmoNetConfig`,
:class:`~emonet.training.trainer.FitResult`, :class:`~emonet.reports.evaluation.EvaluationReport`,
:class:`~emonet.tracking.registry.PromotionDecision`), by keyword.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import mlflow.data
import pandas as pd
from mlflow.entities import DatasetInput, InputTag, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from prefect import get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import ObjectNotFound
from prefect.tasks import exponential_backoff

from emonet.config import EmoNetConfig, config_to_dict
from emonet.data.normalize import AffectNormalizer
from emonet.metrics.bootstrap import DEFAULT_CONFIDENCE
from emonet.reports.evaluation import EvaluationReport, evaluate_checkpoint, split_fingerprint
from emonet.reports.review import review_predictions
from emonet.schema import EMOTIONS
from emonet.tracking.recipe import code_version, recipe_tags, retraining_unneeded
from emonet.tracking.registry import PromotionDecision, find_run_version, promote_model, recorded_maps
from emonet.tracking.run_logging import log_emonet_model, log_metrics
from emonet.tracking.stale_runs import FLOW_RUN_TAG, close_stale_runs, process_tags
from emonet.training.launcher import launch_training
from emonet.training.trainer import FitResult, train_from_csvs
from emonet.utils.stopping import stop_on_signals, stop_requested
from tasks.report import EpochProgress

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


@task(name="start-mlflow-run", **TRACKING_RETRIES, **NOT_CACHED)
def start_mlflow_run(
    experiment_id: str, flow_run_id: str | None, flow_run_name: str | None, params: dict[str, Any]
) -> str:
    """Close the runs that killed flow runs left RUNNING, then open the MLflow run of this
    flow run, tagged with the Prefect flow run and this process, and log its parameters."""
    client = MlflowClient()
    logger = get_run_logger()
    try:
        closed_runs = close_stale_runs(client, experiment_id, final_flow_run_state)
    except Exception:  # tidying up after other flow runs must never stop this one
        logger.warning("could not look for MLflow runs left RUNNING by killed flow runs", exc_info=True)
        closed_runs = []
    for closed in closed_runs:
        logger.warning("MLflow run %s marked %s: %s", closed["run_id"], closed["status"], closed["reason"])
    tags = {FLOW_RUN_TAG: str(flow_run_id), "prefect.flow_run_name": str(flow_run_name), **process_tags()}
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


# Run tags of a flow run that did not train (see check_retraining).
TRAINING_SKIPPED_TAG = "emonet.training_skipped"
SKIP_REASON_TAG = "emonet.skip_reason"


@task(name="check-retraining", **TRACKING_RETRIES, **NOT_CACHED)
def check_retraining(
    *,
    run_id: str,
    registered_model_name: str,
    frames: dict[str, pd.DataFrame],
    normalization_json: Path,
    config: EmoNetConfig,
    force_retrain: bool = False,
) -> str | None:
    """Tag the run with what it trains from (the split fingerprints with the affect
    normalization, the resolved config, the code's git commit), and say why training can
    be skipped: the champion's run recorded the same (:func:`emonet.tracking.recipe.retraining_unneeded`).

    Returns the reason to skip, already logged and tagged on the run
    (``emonet.training_skipped``, ``emonet.skip_reason``), or None to train.
    """
    logger = get_run_logger()
    client = MlflowClient()
    tags = recipe_tags(
        {split: split_fingerprint(frame) for split, frame in sorted(frames.items())},
        json.loads(Path(normalization_json).read_text()),
        config_to_dict(config),
        code_version(),
    )
    reason = retraining_unneeded(client, registered_model_name, tags)
    if reason is not None and force_retrain:
        logger.info("force_retrain: training although %s", reason)
        reason = None
    tags[TRAINING_SKIPPED_TAG] = str(reason is not None).lower()
    if reason is not None:
        tags[SKIP_REASON_TAG] = reason
        logger.info("skipping training: %s (force_retrain=True trains anyway)", reason)
    # One request, so a run never holds the recipe without the decision taken on it.
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    return reason


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


@task(name="evaluate-model", **TRACKING_RETRIES, **NOT_CACHED)
def evaluate_model(
    *,
    run_id: str,
    checkpoint: Path,
    test_csv: Path,
    img_dir: Path,
    normalization_json: Path,
    out_dir: Path,
    val_csv: Path | None = None,
    model_name: str | None = None,
) -> EvaluationReport:
    """Test metrics (both APs, with bootstrap intervals), the per-emotion table, the
    benchmark table and the figures, logged to the run; with ``val_csv``, the same model's
    validation predictions too, for the promotion.

    The report's predictions, thresholds and config serve the review and the
    registration, so the checkpoint is loaded here only.
    """
    report = evaluate_checkpoint(
        checkpoint,
        test_csv,
        img_dir,
        out_dir,
        normalizer=normalization_json,
        validation=val_csv,
        model_name=model_name,
    )
    client = MlflowClient()
    log_metrics(client, run_id, report.metrics, prefix="test_")
    log_metrics(client, run_id, report.metrics_at_half, prefix="test_at_0.5_")
    log_metrics(client, run_id, report.by_visibility, prefix="test_")  # e.g. test_mAP_face_whole
    # e.g. test_mAP_ci_low, test_mAP_voc11_ci_high, test_mae_valence_1_10_ci_low
    log_metrics(client, run_id, interval_metrics(report), prefix="test_")
    client.log_table(run_id, data=report.per_emotion.reset_index(), artifact_file="evaluation/per_emotion.json")
    for path in report.files.values():
        client.log_artifact(run_id, str(path), "evaluation")
    return report


def interval_metrics(report: EvaluationReport) -> dict[str, float]:
    """The bootstrap intervals as flat metrics: ``<metric>_ci_low`` and ``<metric>_ci_high``."""
    return {
        f"{key}_ci_{end}": getattr(interval, end)
        for key, interval in report.intervals.items()
        for end in ("low", "high")
    }


@task(name="review-predictions", **TRACKING_RETRIES, **NOT_CACHED)
def review_model(
    *,
    run_id: str,
    checkpoint: Path,
    evaluation: EvaluationReport,
    test_csv: Path,
    img_dir: Path,
    out_dir: Path,
    num_samples: int = 24,
    detailed_samples: int = 6,
) -> Path:
    """The visual review of the test split (worst predictions first), from the evaluation's
    predictions and linking its report, without loading ``checkpoint`` again (it names the
    model on the page); it goes to the run's ``review/`` artifacts, beside
    ``evaluation/``, so the page's links resolve in MLflow too."""
    review_predictions(
        evaluation.predictions,
        test_csv,
        img_dir,
        out_dir,
        thresholds=evaluation.thresholds,
        normalizer=evaluation.normalizer,
        model_name=str(checkpoint),
        num_samples=num_samples,
        detailed_samples=detailed_samples,
        sort_by="worst",
        progress=False,
        split_report=evaluation.files,
        intervals=evaluation.intervals,
    )
    MlflowClient().log_artifacts(run_id, str(out_dir), "review")
    return Path(out_dir) / "index.html"


@task(name="register-model", **TRACKING_RETRIES, **NOT_CACHED)
def register_model(
    *,
    run_id: str,
    checkpoint: Path,
    normalization_json: Path,
    evaluation: EvaluationReport,
    registered_model_name: str,
    test_csv: Path,
    img_dir: Path,
    val_csv: Path | None = None,
    min_improvement: float = 0.0,
    promotion_split: str = "val",
    promotion_confidence: float = DEFAULT_CONFIDENCE,
) -> PromotionDecision:
    """Log the pyfunc model and register it once per run (a retry reuses the version),
    then move `champion` only when the evidence says it beats the champion on
    ``promotion_split`` (:func:`emonet.tracking.registry.promote_model`): on validation
    (``evaluation.validation``, the rows of ``val_csv``) by default, on the test split
    (``evaluation.predictions``, ``test_csv``) when asked. The checkpoint is logged with
    the evaluation's config, not loaded again. The version is tagged with its test and
    validation mAP; its description summarizes its test metrics with their intervals,
    the validation mAP and the decision with its interval and split. The returned
    decision carries the previous champion's recorded mAP on both splits."""
    logger = get_run_logger()
    client = MlflowClient()
    splits = {"test": (evaluation.predictions, evaluation.split_id, test_csv)}
    if evaluation.validation is not None:
        splits["val"] = (evaluation.validation.predictions, evaluation.validation.split_id, val_csv)
    if promotion_split not in splits:
        raise ValueError(
            f"promotion_split {promotion_split!r} needs the evaluation's predictions on that split "
            f"(the evaluation has {sorted(splits)}): evaluate with val_csv"
        )
    version = find_run_version(client, registered_model_name, run_id)
    if version is None:
        version = log_emonet_model(
            run_id,
            checkpoint,
            normalization_json,
            registered_model_name=registered_model_name,
            config=evaluation.config,
        )
    else:
        logger.info(
            "run %s already registered %s version %s: reusing it", run_id, registered_model_name, version.version
        )
    own_maps = {"test": evaluation.metrics["mAP"]}
    if evaluation.validation is not None:
        own_maps["val"] = evaluation.validation.metrics["mAP"]
    del own_maps[promotion_split]  # promote_model tags the version with the deciding split's
    for split, value in own_maps.items():
        client.set_model_version_tag(registered_model_name, version.version, f"{split}_mAP", repr(value))
        client.set_model_version_tag(registered_model_name, version.version, f"{split}_split", splits[split][1])
    predictions, split_id, split_csv = splits[promotion_split]
    decision = promote_model(
        client,
        registered_model_name,
        version.version,
        predictions,
        split_id,
        run_id,
        split=promotion_split,
        split_csv=split_csv,
        img_dir=img_dir,
        min_improvement=min_improvement,
        confidence=promotion_confidence,
    )
    decision = dataclasses.replace(
        decision,
        previous_maps=recorded_maps(
            client,
            registered_model_name,
            decision.previous_version,
            {split: split_id for split, (_, split_id, _) in splits.items()},
        ),
    )
    logger.info("%s version %s: %s", registered_model_name, decision.version, decision.decision)
    client.update_model_version(
        registered_model_name, decision.version, description=version_description(evaluation, run_id, decision)
    )
    return decision


def version_description(evaluation: EvaluationReport, run_id: str, decision: PromotionDecision) -> str:
    """The registered version's description: its test metrics with their intervals, its
    validation mAP and the promotion decision with its split and interval."""
    metrics, intervals = evaluation.metrics, evaluation.intervals
    shown = [
        ("test mAP", "mAP", ".4f"),
        ("test mAP_voc11", "mAP_voc11", ".4f"),
        ("macro F1", "f1_macro", ".4f"),
        ("samples F1", "f1_samples", ".4f"),
        ("valence MAE (1-10)", "mae_valence_1_10", ".3f"),
        ("arousal MAE (1-10)", "mae_arousal_1_10", ".3f"),
    ]
    parts = []
    for label, key, spec in shown:
        if key in metrics:
            interval = intervals.get(key)
            ci = f" {interval.bounds(spec)}" if interval is not None else ""
            parts.append(f"{label} {metrics[key]:{spec}}{ci}")
    confidence = next(iter(intervals.values())).confidence
    validation = (
        f" Validation mAP {evaluation.validation.metrics['mAP']:.4f} on split {evaluation.validation.split_id[:12]}."
        if evaluation.validation is not None
        else ""
    )
    # The reason states the mAP difference and its interval when versions were compared.
    return (
        f"{', '.join(parts)} on test split {evaluation.split_id[:12]} ({100 * confidence:g}% bootstrap intervals; "
        f"MLflow run {run_id}).{validation} "
        f"Promotion on the {decision.split} split {decision.split_id[:12]}: {decision.decision}: {decision.reason}"
    )
