"""Prefect task for the evaluation step: test metrics with their intervals, the
per-emotion and benchmark tables and the figures, logged to the run."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import task

from emonet.reports.evaluation import EvaluationReport, evaluate_checkpoint
from emonet.tracking.run_logging import log_metrics
from tasks.tracking import NOT_CACHED, TRACKING_RETRIES


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
